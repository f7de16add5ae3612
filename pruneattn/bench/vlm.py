"""``pruneattn bench --vlm``: vision-language models, unpatched vs pruneattn vs a VisionZip-style eager baseline.

Models (:mod:`pruneattn.bench.vlm_models`, random weights from configs): a LLaVA-1.5-shaped model (CLIP
ViT-L/14-336 tower, Qwen2-0.5B-shaped language model) and a PaliGemma-224-shaped one (SigLIP So400m/14
tower, 0.5 B Gemma-shaped language model); one image + 32 text tokens per prompt, batch 1 and 4; float32
on a CPU, bfloat16 on a GPU. Configurations, per model and batch:

- ``unpatched``: SDPA everywhere.
- ``pruneattn drop k`` / ``pruneattn fuse k`` (k = 192, 128, 64): ``pruneattn.patch(model, tokens=k, mode=...)``
  with the caller's full prompt (the patch shortens it).
- ``eager baseline k``: what published pruning code does to read the weights: the unmodified tower with
  eager attention and ``output_attentions=True``; the score of each patch, per the SPEC (the class row for
  CLIP, the mean over queries for SigLIP; variance over heads), from the feature layer's weights; the top
  k (ties to the lower index) in raster order; projected and handed to the unmodified language model as
  ``mm_encoder_outputs`` with a prompt of k placeholders. Independent of ``pruneattn.patch``.

Every configuration is its own module tree over the same weight tensors (one copy of the weights).

Metrics: time to first token (TTFT: ``generate`` from the call, tower included, to the first token's
logits) and the decode time per step over the next 32 tokens (greedy, EOS never stops it), both from one
``generate`` call with a logits processor that marks the time of each step (CPU: ``time.perf_counter``;
GPU: CUDA events); peak memory during a ``generate`` of the prefill and one decode step (CPU: peak bytes
of torch's CPU allocator, from ``torch.profiler`` memory events; GPU: ``torch.cuda.max_memory_allocated``).
Repeats interleave the configurations (A, B, C, A, B, C, ...), after the memory runs: on a CPU 3 repeats,
the first of which also decodes (the others stop after the first token); on a GPU 10, all decoding. Beside
each row: the FLOP-count bound of :mod:`pruneattn.bench.vlm_flops` (prefill and decode) and, for pruneattn
drop, the share of its kept patches that the eager baseline keeps too.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pruneattn.bench import vlm_flops as F
from pruneattn.bench import vlm_models as VM
from pruneattn.bench.meta import environment, load_average
from pruneattn.bench.timing import _quantiles, peak_cuda_memory

TARGETS = {"ttft_bound_fraction": 0.90}
TARGET_TOKENS = 64  # the token count at which the TTFT bound target is judged


@dataclass(frozen=True)
class VLMConfig:
    """One configuration: ``kind`` "unpatched", "pruneattn" or "eager" (the baseline)."""

    kind: str
    tokens: int | None = None
    mode: str = "drop"

    @property
    def name(self) -> str:
        if self.kind == "unpatched":
            return "unpatched"
        if self.kind == "pruneattn":
            return f"pruneattn {self.mode} {self.tokens}"
        return f"eager baseline {self.tokens}"

    @property
    def pruning(self) -> F.Pruning:
        if self.kind == "unpatched":
            return F.NONE
        if self.kind == "pruneattn":
            return F.Pruning("tower", self.tokens, self.mode == "fuse")
        return F.Pruning("projector", self.tokens)


UNPATCHED = VLMConfig("unpatched")


def configs_for(tokens: tuple[int, ...]) -> tuple[VLMConfig, ...]:
    out = [UNPATCHED]
    for k in tokens:
        out += [VLMConfig("pruneattn", k, "drop"), VLMConfig("pruneattn", k, "fuse"), VLMConfig("eager", k)]
    return tuple(out)


# ----------------------------------------------------------------------------- the eager baseline


def eager_scores(attn: torch.Tensor, query: str, num_prefix: int) -> torch.Tensor:
    """(B, P) float32 scores from eager attention weights (B, H, N, N): per head the attention each patch
    receives (``"cls"``: the class token's row; ``"mean"``: the mean over queries), variance over heads."""
    a = attn[:, :, 0] if query == "cls" else attn.float().mean(dim=2)
    return a[:, :, num_prefix:].float().var(dim=1, unbiased=False)


def top_k_raster(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64: the k highest scores, ties to the lower index, in ascending (raster) order."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


class EagerBaseline:
    """VisionZip-style selection on an unmodified model whose tower runs eager attention."""

    def __init__(self, model: torch.nn.Module, tokens: int) -> None:
        self.model, self.tokens = model, tokens
        self.llava = hasattr(model.config, "vision_feature_layer")
        self.kept: torch.Tensor | None = None  # the last call's kept patches (B, k)

    def image_features(self, pixel_values: torch.Tensor) -> dict:
        """``mm_encoder_outputs`` for the language model: the k selected patches of each image, projected."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        base = self.model.model
        out = base.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True, return_dict=True)
        if self.llava:
            layer = base.config.vision_feature_layer
            depth = len(out.attentions)
            attn = out.attentions[layer % (depth + 1) - 1]
            feats = out.hidden_states[layer]
            if base.config.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]
            scores = eager_scores(attn, "cls", 1)
        else:
            attn, feats = out.attentions[-1], out.last_hidden_state
            scores = eager_scores(attn, "mean", 0)
        idx = top_k_raster(scores, self.tokens)
        self.kept = idx
        feats = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        projected = base.multi_modal_projector(feats)
        pooled = list(projected) if self.llava else projected  # as each model's get_image_features returns it
        return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}


def eager_model(model: torch.nn.Module) -> torch.nn.Module:
    """A module tree over ``model``'s weights whose vision tower runs eager attention."""
    m = shared_copy(model)
    m.model.vision_tower.set_attn_implementation("eager")
    return m


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters are ``model``'s own tensors (configs, buffers copied)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


# ----------------------------------------------------------------------------- clocks and memory


class WallClock:
    """Step marks with ``time.perf_counter`` (CPU), and the process's CPU time (all its threads) beside:
    on a shared machine a descheduled thread stops the wall clock's meaning, not the CPU time's."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.cpu: list[float] = []

    def mark(self) -> None:
        self.marks.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def seconds(self) -> list[float]:
        """Seconds from the first mark to each later one."""
        return [t - self.marks[0] for t in self.marks[1:]]

    def cpu_seconds(self) -> list[float]:
        """CPU seconds of the process (every thread) from the first mark to each later one."""
        return [t - self.cpu[0] for t in self.cpu[1:]]


class EventClock:
    """Step marks with CUDA events (recorded on the stream, no sync per step); ``event`` makes one."""

    def __init__(self, event: Callable | None = None) -> None:
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.marks: list = []

    def mark(self) -> None:
        e = self.event()
        e.record()
        self.marks.append(e)

    def seconds(self) -> list[float]:
        self.marks[-1].synchronize()
        return [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks[1:]]


def clock_for(device: torch.device | str) -> type:
    return EventClock if torch.device(device).type == "cuda" else WallClock


def peak_reader_for(device: torch.device | str) -> Callable[[Callable[[], object]], float]:
    """``read(fn)`` -> MiB: the peak memory ``fn`` needed above what was held before it (CPU: torch's
    allocator from profiler memory events; CUDA: ``max_memory_allocated``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda fn: peak_cuda_memory(fn, device) / 2**20
    from pruneattn.bench.models_cpu import allocator_peak_of

    return allocator_peak_of


def _step_marks(clock) -> object:
    from transformers import LogitsProcessor

    class StepMarks(LogitsProcessor):
        """Marks the time whenever a step's logits are ready (the first call: the first token)."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            clock.mark()
            return scores

    return StepMarks()


# ----------------------------------------------------------------------------- runs


class Candidate:
    """One configuration of one model, ready to run ``generate`` on a fixed batch."""

    def __init__(self, config: VLMConfig, model: torch.nn.Module, inputs: dict) -> None:
        self.config, self.model = config, model
        self.baseline = EagerBaseline(model, config.tokens) if config.kind == "eager" else None
        if self.baseline is not None:
            self.inputs = short_prompt(inputs, model.config.image_token_id, config.tokens)
            self.pixels = inputs["pixel_values"]
        else:
            self.inputs = inputs

    def generate(self, new_tokens: int, clock=None, first: bool = False) -> torch.Tensor:
        """``generate`` of ``new_tokens`` tokens (``first``: on the batch's first prompt only); ``clock``
        gets a mark at the call and one per step."""
        from transformers import LogitsProcessorList

        inputs, pixels = self.inputs, getattr(self, "pixels", None)
        if first:
            inputs = {k: v[:1] for k, v in inputs.items()}
            pixels = None if pixels is None else pixels[:1]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if clock is not None:
            kw["logits_processor"] = LogitsProcessorList([_step_marks(clock)])
            clock.mark()
        with torch.no_grad():
            if self.baseline is None:
                return self.model.generate(**inputs, **kw)
            return self.model.generate(**inputs, mm_encoder_outputs=self.baseline.image_features(pixels), **kw)

    def kept_patches(self) -> torch.Tensor | None:
        """The patches the last call kept (B, k), or None (unpatched)."""
        if self.baseline is not None:
            return self.baseline.kept
        if self.config.kind == "pruneattn":
            import pruneattn

            return next(iter(pruneattn.kept_indices(self.model).values()))
        return None


def module_trees(model: torch.nn.Module, configs) -> dict[str, torch.nn.Module]:
    """Per configuration its own module tree over ``model``'s weights: ``model`` itself (unpatched), a
    patched copy (pruneattn), a copy with an eager tower (the baseline)."""
    import pruneattn

    out = {}
    for c in configs:
        if c.kind == "unpatched":
            out[c.name] = model
        elif c.kind == "pruneattn":
            out[c.name] = pruneattn.patch(shared_copy(model), tokens=c.tokens, mode=c.mode)
        else:
            out[c.name] = eager_model(model)
    return out


def candidates(trees: dict[str, torch.nn.Module], configs, inputs: dict) -> dict[str, Candidate]:
    """A :class:`Candidate` per configuration on the batch ``inputs`` (processor-style, full placeholders)."""
    return {c.name: Candidate(c, trees[c.name], inputs) for c in configs}


def short_prompt(inputs: dict, image_token_id: int, k: int) -> dict:
    """The prompt a processor would make with k placeholders per image: each row's placeholders after its
    first k removed (every row holds one image), the text and the other per-token tensors unchanged;
    without ``pixel_values``."""
    ids = inputs["input_ids"]
    image = ids == image_token_id
    keep = ~image | (image.long().cumsum(1) <= k)
    B = ids.shape[0]
    return {name: t[keep].view(B, -1) for name, t in inputs.items()
            if name in ("input_ids", "attention_mask", "token_type_ids")}


def time_candidates(cands: dict[str, Candidate], clock_cls: type, *, reps: int, decode_reps: int,
                    new_tokens: int, log: Callable[[str], None] = lambda msg: None) -> dict[str, dict]:
    """Interleaved repeats; in the first ``decode_reps`` each candidate decodes ``new_tokens`` after the
    first token, in the others it stops there. Returns per candidate the TTFT samples (s) and the decode
    step times (s)."""
    samples = {name: {"ttft": [], "steps": [], "ttft_cpu": [], "steps_cpu": []} for name in cands}
    for r in range(reps):
        log(f"repeat {r + 1} of {reps}")
        for name, cand in cands.items():
            clock = clock_cls()
            cand.generate(1 + new_tokens if r < decode_reps else 1, clock)
            for key, t in (("", clock.seconds()), ("_cpu", clock.cpu_seconds() if hasattr(clock, "cpu_seconds") else [])):
                if t:
                    samples[name]["ttft" + key].append(t[0])
                    samples[name]["steps" + key] += [b - a for a, b in zip(t, t[1:])]
    return samples


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"median_s": float("nan"), "q1_s": float("nan"), "q3_s": float("nan"), "n": 0}
    q1, med, q3 = _quantiles(xs)
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "n": len(xs)}


@dataclass(frozen=True)
class Settings:
    """How a run measures on its device."""

    dtype: torch.dtype
    reps: int  # interleaved TTFT repeats
    decode_reps: int  # of which the first ones also decode
    new_tokens: int  # decoded after the first token
    warmup: bool  # one batch-1 generate per configuration before the memory runs


def settings_for(device: torch.device | str, smoke: bool = False, reps: int | None = None,
                 decode_reps: int | None = None, new_tokens: int | None = None) -> Settings:
    """GPU: bfloat16, 10 repeats that all decode, a warm-up (Triton compiles, cuBLAS handles); CPU: float32,
    3 repeats of which the first decodes (the decode steps are the long part there), no warm-up other than
    the memory run, which precedes the timed repeats (its peak is the same at batch 1 and 4 per image, so
    no one-time allocation inflates it); smoke: one repeat of 4 tokens."""
    cuda = torch.device(device).type == "cuda"
    reps = reps or (1 if smoke else 10 if cuda else 3)
    return Settings(
        dtype=torch.bfloat16 if cuda else torch.float32, reps=reps,
        decode_reps=min(reps, decode_reps or (reps if cuda and not smoke else 1)),
        new_tokens=new_tokens or (4 if smoke else 32), warmup=cuda and not smoke,
    )


def run_vlm(device="cpu", cases=VM.CASES, *, reps: int | None = None, decode_reps: int | None = None,
            new_tokens: int | None = None, smoke: bool = False, threads: int = 2, memory: bool = True,
            progress: bool = True, checkpoint: str | None = None) -> dict:
    """The whole suite; returns ``{"environment", "settings", "rows", "checks", "models", "load_average_end"}``.
    ``progress``: a line per phase on stderr; ``checkpoint``: a JSON file rewritten with the rows so far
    after each model and batch (a long run that fails late keeps what it measured)."""
    import sys

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[vlm {time.perf_counter() - t0:7.0f} s, load {load_average()}] {msg}", file=sys.stderr, flush=True)

    device = torch.device(device)
    st = settings_for(device, smoke, reps, decode_reps, new_tokens)
    dtype, reps, decode_reps, new_tokens = st.dtype, st.reps, st.decode_reps, st.new_tokens
    if device.type == "cpu":
        torch.set_num_threads(threads)
    env = environment(device)
    clock_cls, read_peak = clock_for(device), peak_reader_for(device)
    rows: list[dict] = []
    models_info: list[dict] = []
    for case in cases:
        log(f"building {case.name}")
        model = VM.build(case, device=device, dtype=dtype)
        shape = F.shape_of(model.config, case.text_tokens)
        models_info.append({"model": case.name, "parameters": VM.num_parameters(model), "q_scale": case.q_scale,
                            "placeholders_per_image": case.placeholders, "text_tokens": case.text_tokens})
        configs = configs_for(case.tokens)
        trees = module_trees(model, configs)
        for i, batch in enumerate(case.batches):
            cands = candidates(trees, configs, VM.prompt(case, batch, device=device, dtype=dtype))
            log(f"{case.name} batch {batch}: {len(cands)} configurations" + (", memory runs" if memory else ""))
            if st.warmup and i == 0:  # one-time costs (lazy imports, first allocations) of each configuration
                for cand in cands.values():
                    cand.generate(2, first=True)
            peaks = {name: read_peak(lambda cand=cand: cand.generate(2)) for name, cand in cands.items()} if memory else {}
            samples = time_candidates(cands, clock_cls, reps=reps, decode_reps=decode_reps, new_tokens=new_tokens,
                                      log=lambda msg: log(f"{case.name} batch {batch}: {msg}"))
            rows += _rows(case, batch, cands, samples, peaks, shape, new_tokens, env, dtype, threads, device)
            if checkpoint:
                from pruneattn.bench.report import write_json

                write_json(checkpoint, {"environment": env, "rows": rows, "partial": True})
            del cands
        del model, trees
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings = {"dtype": str(dtype).replace("torch.", ""), "ttft_reps": reps, "decode_reps": decode_reps,
                "new_tokens": 1 + new_tokens, "warmup": st.warmup, "memory": memory,
                "memory_run": "generate of 2 new tokens (prefill + one decode step)"}
    return {"environment": env, "settings": settings, "rows": rows, "checks": checks(rows), "models": models_info,
            "load_average_end": load_average()}


def _agreement(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Fraction of the kept patches two selections share (same batch, same k)."""
    if a is None or b is None or a.shape != b.shape:
        return float("nan")
    same = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b))
    return same / a.numel()


def _rows(case, batch, cands, samples, peaks, shape, new_tokens, env, dtype, threads, device) -> list[dict]:
    base = _stats(samples[UNPATCHED.name]["ttft"])["median_s"]
    base_step = _stats(samples[UNPATCHED.name]["steps"])["median_s"]
    base_cpu = _stats(samples[UNPATCHED.name]["ttft_cpu"])["median_s"]
    eager_ttft = {c.config.tokens: _stats(samples[n]["ttft"])["median_s"] for n, c in cands.items() if c.config.kind == "eager"}
    eager_cpu = {c.config.tokens: _stats(samples[n]["ttft_cpu"])["median_s"] for n, c in cands.items() if c.config.kind == "eager"}
    eager_kept = {c.config.tokens: c.kept_patches() for c in cands.values() if c.config.kind == "eager"}
    rows = []
    for name, cand in cands.items():
        c = cand.config
        t, st = _stats(samples[name]["ttft"]), _stats(samples[name]["steps"])
        bound = F.bound(shape, c.pruning, "prefill")
        dbound = F.bound(shape, c.pruning, "decode", new_tokens)
        row = {
            "suite": "vlm", "model": case.name, "batch": batch, "config": name, "kind": c.kind,
            "tokens": c.tokens or F.image_tokens(shape), "mode": c.mode if c.kind == "pruneattn" else "",
            "image_tokens_to_lm": F.image_tokens(shape, c.pruning), "prompt_tokens_to_lm": F.prompt_tokens(shape, c.pruning),
            "dtype": str(dtype).replace("torch.", ""),
            "ttft_ms": t["median_s"] * 1e3, "ttft_q1_ms": t["q1_s"] * 1e3, "ttft_q3_ms": t["q3_s"] * 1e3, "ttft_reps": t["n"],
            "ttft_speedup": base / t["median_s"], "ttft_flop_bound": bound,
            "bound_fraction": (base / t["median_s"]) / bound,
            "prefill_gflop": F.prefill_flops(shape, c.pruning) / 1e9,
            "decode_ms_per_step": st["median_s"] * 1e3, "decode_q1_ms": st["q1_s"] * 1e3, "decode_q3_ms": st["q3_s"] * 1e3,
            "decode_steps": st["n"], "decode_tok_s": batch / st["median_s"],
            "decode_speedup": base_step / st["median_s"], "decode_flop_bound": dbound,
            "decode_gflop_per_token": F.decode_flops(shape, c.pruning, new_tokens) / 1e9,
            "over_eager": eager_ttft[c.tokens] / t["median_s"] if c.kind == "pruneattn" and c.tokens in eager_ttft else float("nan"),
            "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
            "threads": threads if device.type == "cpu" else None,
        }
        if samples[name]["ttft_cpu"]:  # the process's CPU time (CPU runs): steadier on a shared machine
            cpu, scpu = _stats(samples[name]["ttft_cpu"]), _stats(samples[name]["steps_cpu"])
            row.update({
                "ttft_cpu_s": cpu["median_s"], "ttft_cpu_q1_s": cpu["q1_s"], "ttft_cpu_q3_s": cpu["q3_s"],
                "ttft_cpu_speedup": base_cpu / cpu["median_s"], "bound_fraction_cpu": base_cpu / cpu["median_s"] / bound,
                "over_eager_cpu": eager_cpu[c.tokens] / cpu["median_s"] if c.kind == "pruneattn" and c.tokens in eager_cpu
                else float("nan"),
                "decode_cpu_ms_per_step": scpu["median_s"] * 1e3,
            })
        if name in peaks:
            row["peak_mb"] = peaks[name]
        if c.kind == "pruneattn" and c.mode == "drop":
            row["same_kept_as_eager"] = _agreement(cand.kept_patches(), eager_kept.get(c.tokens))
        rows.append(row)
    return rows


def checks(rows: list[dict]) -> list[dict]:
    """Each target with its numbers and whether it is met, per pruneattn row (nothing asserts these)."""
    by = {(r["model"], r["batch"], r["config"]): r for r in rows}
    out = []
    for r in rows:
        if r["kind"] != "pruneattn":
            continue
        un = by[(r["model"], r["batch"], UNPATCHED.name)]
        eager = by.get((r["model"], r["batch"], VLMConfig("eager", r["tokens"]).name))
        c = {"model": r["model"], "batch": r["batch"], "config": r["config"],
             "ttft_speedup": r["ttft_speedup"], "ttft_flop_bound": r["ttft_flop_bound"], "bound_fraction": r["bound_fraction"]}
        if "bound_fraction_cpu" in r:
            c["bound_fraction_cpu"] = r["bound_fraction_cpu"]
        if r["tokens"] == TARGET_TOKENS:
            c["ttft_bound_ok"] = r["bound_fraction"] >= TARGETS["ttft_bound_fraction"]
        if eager is not None:
            c["over_eager"] = r["over_eager"]
            c["over_eager_ok"] = r["ttft_ms"] < eager["ttft_ms"]
            if "over_eager_cpu" in r:
                c["over_eager_cpu"] = r["over_eager_cpu"]
        if "peak_mb" in r:
            c["peak_mb"] = r["peak_mb"]
            if eager is not None:
                c["eager_peak_mb"] = eager["peak_mb"]
                c["below_eager_peak_ok"] = r["peak_mb"] < eager["peak_mb"]
            c["unpatched_peak_mb"] = un["peak_mb"]
            c["below_unpatched_peak_ok"] = r["peak_mb"] < un["peak_mb"]
        out.append(c)
    return out


VERDICTS = ("ttft_bound_ok", "over_eager_ok", "below_eager_peak_ok", "below_unpatched_peak_ok")
VERDICT_TEXT = {
    "ttft_bound_ok": f"TTFT speed-up at {TARGET_TOKENS} tokens >= {TARGETS['ttft_bound_fraction']:.0%} of its FLOP-count bound",
    "over_eager_ok": "pruneattn TTFT below the eager baseline's at the same token count",
    "below_eager_peak_ok": "pruneattn peak memory below the eager baseline's at the same token count",
    "below_unpatched_peak_ok": "pruneattn peak memory below the unpatched model's",
}


# The timing targets judged again on the process's CPU time (CPU runs), beside the wall-clock verdict.
ON_CPU_TIME = {
    "ttft_bound_ok": lambda c: c["bound_fraction_cpu"] >= TARGETS["ttft_bound_fraction"],
    "over_eager_ok": lambda c: c["over_eager_cpu"] > 1.0,
}


def summary(checks_: list[dict]) -> list[dict]:
    """One line per target: met in how many settings, and which missed it (and, for the timing targets of
    a CPU run, the same on CPU time)."""
    out = []
    for key in VERDICTS:
        judged = [c for c in checks_ if key in c]
        if not judged:
            continue
        missed = [f"{c['model']} b{c['batch']} {c['config']}" for c in judged if not c[key]]
        line = {"target": VERDICT_TEXT[key], "met": f"{len(judged) - len(missed)} of {len(judged)}",
                "all_met": not missed, "missed": "; ".join(missed) or "-"}
        on_cpu = ON_CPU_TIME.get(key)
        if on_cpu is not None and all(k in c for c in judged for k in ("bound_fraction_cpu", "over_eager_cpu")):
            cpu_missed = [f"{c['model']} b{c['batch']} {c['config']}" for c in judged if not on_cpu(c)]
            line["met_on_cpu_time"] = f"{len(judged) - len(cpu_missed)} of {len(judged)}"
            line["missed_on_cpu_time"] = "; ".join(cpu_missed) or "-"
        out.append(line)
    return out


def plot(rows: list[dict], path: str) -> bool:
    """Left: TTFT speed-up over unpatched per model / batch / token count (pruneattn drop, fuse, eager
    baseline, FLOP bound of pruneattn drop); right: peak memory of the same (log scale), unpatched as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["model"], r["batch"], r["tokens"]) for r in rows if r["kind"] != "unpatched"))
    get = {(r["model"], r["batch"], r["config"]): r for r in rows}
    series = {"pruneattn drop": lambda g: get.get((g[0], g[1], f"pruneattn drop {g[2]}")),
              "pruneattn fuse": lambda g: get.get((g[0], g[1], f"pruneattn fuse {g[2]}")),
              "eager baseline": lambda g: get.get((g[0], g[1], f"eager baseline {g[2]}"))}
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 1.1 * len(groups) + 4), 4.5))
    width = 0.8 / 4
    xs = range(len(groups))
    labels = [f"{m} b{b} k{k}" for m, b, k in groups]
    for i, (name, pick) in enumerate(series.items()):
        vals = [(pick(g) or {}).get("ttft_speedup", 0.0) for g in groups]
        axes[0].bar([x + (i - 1.5) * width for x in xs], vals, width, label=name)
        mem = [(pick(g) or {}).get("peak_mb", 0.0) for g in groups]
        axes[1].bar([x + (i - 1) * width for x in xs], mem, width, label=name)
    bound = [(series["pruneattn drop"](g) or {}).get("ttft_flop_bound", 0.0) for g in groups]
    axes[0].bar([x + 1.5 * width for x in xs], bound, width, label="FLOP bound (drop)", color="0.75")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("TTFT speed-up over unpatched")
    unp = [(get.get((g[0], g[1], UNPATCHED.name)) or {}).get("peak_mb", 0.0) for g in groups]
    axes[1].scatter(list(xs), unp, marker="_", s=300, color="k", label="unpatched", zorder=3)
    axes[1].set_ylabel("peak memory (MiB above the weights, log scale)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    r0 = rows[0]
    fig.suptitle(f"VLM prefill: {r0['dtype']}, {r0['device']}" + (f", {r0['threads']} threads" if r0.get("threads") else ""),
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
