"""``pruneattn bench --vlm-qwen``, and the runner of every keep-rate suite: a vision-language model whose images
keep a share of their units, unpatched vs pruneattn vs an eager last block. The models are :class:`RateSuite`
entries: :data:`QWEN25` here, ``--vlm-qwen3`` in :mod:`pruneattn.bench.vlm_qwen3`, ``--vlm-internvl`` in
:mod:`pruneattn.bench.vlm_internvl`; everything else is shared.

Qwen2.5-VL (random weights from configs): its vision tower's block shape (width 1280, 16 heads of 80, SwiGLU
3420, 14 px patches, 112 px windows, 2 x 2 merger), with ``TOWER_DEPTH`` blocks instead of 32 on a CPU (full
attention in every fourth block, the last one included, as in the real tower), and a Qwen2.5-0.5B-shaped
language model (24 layers of width 896, 14 heads, 2 KV heads, vocabulary 151936). Prompts: 16 text tokens,
one image, 16 text tokens; batch 1: a 448 x 448 image (256 merged tokens); batch 2: that and a 672 x 448
one (384), left-padded.

Configurations: ``unpatched``; ``pruneattn r`` (``pruneattn.patch(model, keep_rate=r)``: each image (or tile)
keeps ceil(r * units) of its units, scored in the tower's feature layer by the fused attention); ``eager last
block r``: the same pruning with that block's attention computed by the eager reference, which builds the
N x N weights of each image as published pruning code does to read them (same kept units, same prompt
handling: only the scoring attention differs).

Metrics (one ``generate`` call each, a logits processor marking each step): time to first token (the tower
included), decode time per step over the next tokens, peak memory during a prefill and one decode step
(CPU: torch's allocator; GPU: ``max_memory_allocated``). Repeats interleave the configurations. Beside
each row: the matmul FLOP bound of the prefill (tower + language model) and of a decode step, unpatched
over the configuration. On a GPU: bfloat16, the Triton kernels, CUDA-event step marks, a warm-up.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pruneattn.bench.meta import environment, load_average
from pruneattn.bench.vlm import _stats, clock_for, peak_reader_for, settings_for, shared_copy, time_candidates
from pruneattn.patch.options import Amount
from pruneattn.patch.vlm.tokens import ImageTokens

RATES = (0.25, 0.125)
TEXT_TOKENS = 16  # before and after the image
NEW_TOKENS = 16  # decoded after the first token (smoke: 2)


def prompt(suite: RateSuite, model, images: list[tuple[int, int]], dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> dict:
    """What a Qwen processor returns for one image per prompt: left-padded ids with a placeholder per merged
    token, attention mask, token types, patches and grids."""
    cfg = model.config
    image, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    pad = cfg.get_text_config().pad_token_id or 0
    g = torch.Generator().manual_seed(1)
    grids = [(1, h // suite.patch, w // suite.patch) for h, w in images]
    rows = []
    for t, h, w in grids:
        text = torch.randint(1000, 100000, (2 * TEXT_TOKENS,), generator=g).tolist()
        rows.append(text[:TEXT_TOKENS] + [start] + [image] * (h * w // 4) + [end] + text[TEXT_TOKENS:])
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, 3 * 2 * suite.patch * suite.patch, generator=g).to(dtype)
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image).int(), pixel_values=pixels,
               image_grid_thw=torch.tensor(grids))
    return {k: v.to(device) for k, v in out.items()}


def kept_units(inputs: dict, rate: float | None) -> tuple[list[int], list[int]]:
    """(units, kept units) of each image of a Qwen batch, unpruned (``rate`` None) or at ``rate`` (the count
    the patched model and a planning processor use)."""
    units = [t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    tokens = ImageTokens((Amount(1.0 if rate is None else rate),))
    return units, [tokens.kept(u) for u in units]


def lm_flops(cfg, tokens: int, context: int, new: int) -> float:
    """Matmul FLOPs of ``new`` tokens of the language model after ``context`` cached ones (``tokens``:
    how many rows; logits for the last one only, as ``generate`` asks)."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads)
    kv = cfg.num_key_value_heads * q // cfg.num_attention_heads
    per_token = 2 * (2 * H * q + 2 * H * kv + 3 * H * I)
    attention = 2 * 2 * q * (context + (new + 1) / 2)
    return tokens * L * (per_token + attention) + 2 * H * V


def flop_bounds(suite: RateSuite, model, inputs: dict, rate: float | None) -> tuple[float, float]:
    """(prefill, decode step) FLOPs of a Qwen batch, unpruned (``rate`` None) or at ``rate``."""
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    units, kept = kept_units(inputs, rate)
    real = inputs["attention_mask"].sum(1).tolist()
    rows = [r - (u - k) for r, u, k in zip(real, units, kept)]
    text = model.config.get_text_config()
    prefill = suite.tower_flops(model.config.vision_config, grids, kept) + sum(lm_flops(text, r, 0, r) for r in rows)
    decode = sum(lm_flops(text, 1, r, 1) for r in rows)
    return prefill, decode


@dataclass(frozen=True)
class RateSuite:
    """One model of the keep-rate suites: how to build it, its prompts and how to count its FLOPs (the
    Qwen family's functions by default)."""

    stem: str  # result files: <stem>.json, <stem>.md
    title: str
    build: Callable[..., torch.nn.Module]  # (depth, text_layers, dtype, smoke) -> the model, random weights
    tower_flops: Callable | None  # Qwen: (vision config, grids, kept units per image) -> FLOPs
    describe: Callable[[dict], str]  # the results' model sentence, from the run's settings
    images: dict[int, list[tuple[int, int]]]  # (height, width) per prompt's image, per batch size
    patch: int  # pixels per patch side
    tower_depth: int  # tower blocks the run builds
    full_attention: Callable[[int], list[int]] = field(default=lambda depth: list(range(depth)))
    prompt: Callable[..., dict] = prompt  # (suite, model, images, dtype, device) -> the processor's outputs
    flop_bounds: Callable[..., tuple[float, float]] = flop_bounds  # (suite, model, inputs, rate) -> FLOPs
    image_tokens: Callable[[dict, float | None], int] = field(  # image tokens the language model reads
        default=lambda inputs, rate: sum(kept_units(inputs, rate)[1]))
    smoke_depth: int = 4  # tower blocks of a smoke run
    smoke_batches: tuple[int, ...] | None = None  # batch sizes of a smoke run (None: all)


# ----------------------------------------------------------------------------- the Qwen2.5-VL shape

TOWER_DEPTH = 8
TEXT = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, pad_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                         "mrope_section": [8, 12, 12]})
IMAGE, VISION_START, VISION_END = 151655, 151652, 151653
SMOKE_TEXT = dict(TEXT, vocab_size=152000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})


def build(depth: int = TOWER_DEPTH, text_layers: int | None = None, dtype: torch.dtype = torch.float32,
          smoke: bool = False):
    """The Qwen2.5-VL-shaped model, random weights, q / k of the tower scaled so that its scores differ
    (``smoke``: widths of 64, for the suite's plumbing test)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(SMOKE_TEXT if smoke else TEXT, **({} if text_layers is None else {"num_hidden_layers": text_layers}))
    width = 64 if smoke else 1280
    vision = dict(depth=depth, hidden_size=width, num_heads=4 if smoke else 16, intermediate_size=128 if smoke else 3420,
                  out_hidden_size=text["hidden_size"], patch_size=14, window_size=112,
                  fullatt_block_indexes=list(range(3, depth, 4)), temporal_patch_size=2, spatial_merge_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().to(dtype)
    sharpen(model.model.visual)
    return model


def sharpen(tower, factor: float = 2.0) -> None:
    """Scale the q and k rows of each tower block's fused projection, so that the attention is far from
    uniform and the unit scores differ (random weights alone give near ties)."""
    with torch.no_grad():
        for block in tower.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(factor)


def _tower_flops(cfg, grids: list[tuple[int, int, int]], kept_units: list[int]) -> float:
    """Matmul FLOPs of the tower: projections, MLP, attention (windows or whole images), merger; the
    last block's MLP and the merger on the kept units only."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size
    per_token = 2 * (4 * C * C)  # qkv + proj
    mlp = 2 * 3 * C * I
    window = (cfg.window_size // cfg.patch_size) ** 2
    total = 0.0
    for (t, h, w), k in zip(grids, kept_units):
        n = t * h * w
        for i in range(cfg.depth):
            span = n if i in cfg.fullatt_block_indexes else min(n, window)
            total += n * (per_token + 2 * 2 * span * C)
            total += (4 * k if i == cfg.depth - 1 else n) * mlp
        total += k * 2 * (4 * C * 4 * C + 4 * C * D)
    return total


def _describe(st: dict) -> str:
    return (f"Qwen2.5-VL's tower block shape (width 1280, 16 heads of 80, 112 px windows) with {st['tower_blocks']} "
            f"blocks instead of 32 (full attention in {st['tower_full_attention']}), a "
            f"{st['language_model_layers']}-layer Qwen2.5-0.5B-shaped language model")


QWEN25 = RateSuite(
    "vlm_qwen", "Qwen2.5-VL-shaped model: unpatched vs pruneattn vs an eager last block", build, _tower_flops,
    _describe, images={1: [(448, 448)], 2: [(448, 448), (672, 448)]}, patch=14, tower_depth=TOWER_DEPTH,
    full_attention=lambda depth: list(range(3, depth, 4)),
)


# ----------------------------------------------------------------------------- runs


@dataclass
class Candidate:
    """One configuration on one batch; ``generate(new_tokens, clock)`` as the other VLM suite's."""

    name: str
    model: torch.nn.Module
    inputs: dict
    rate: float | None
    backend: str | None = None  # pruneattn's backend inside its calls (None: the device's default)

    @property
    def eager(self) -> bool:
        return self.backend == "reference"

    def generate(self, new_tokens: int, clock=None) -> torch.Tensor:
        import pruneattn
        from transformers import LogitsProcessorList

        from pruneattn.bench.vlm import _step_marks

        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if clock is not None:
            kw["logits_processor"] = LogitsProcessorList([_step_marks(clock)])
            clock.mark()
        pinned = contextlib.nullcontext() if self.backend is None else pruneattn.use_backend(self.backend)
        with torch.no_grad(), pinned:
            return self.model.generate(**self.inputs, **kw)

    def kept_units(self) -> torch.Tensor | None:
        """The units the last call kept per image (-1 padded), or None (unpatched)."""
        import pruneattn

        return None if self.rate is None else next(reversed(pruneattn.kept_indices(self.model).values()))


def candidates(model, inputs: dict, rates=RATES, backend: str | None = None) -> list[Candidate]:
    """Unpatched, pruneattn at each rate (on ``backend``), the eager last block at each rate (pruneattn's
    reference backend: the scoring attention from the N x N weights)."""
    import pruneattn

    out = [Candidate("unpatched", model, inputs, None, backend)]
    for r in rates:
        out.append(Candidate(f"pruneattn {r}", pruneattn.patch(shared_copy(model), keep_rate=r), inputs, r, backend))
    for r in rates:
        out.append(Candidate(f"eager last block {r}", pruneattn.patch(shared_copy(model), keep_rate=r), inputs, r,
                             "reference"))
    return out


def run_rates(suite: RateSuite = QWEN25, device: torch.device | str = "cpu", *, reps: int | None = None,
              new_tokens: int = NEW_TOKENS, threads: int = 2, depth: int | None = None,
              text_layers: int | None = None, batches: tuple[int, ...] | None = None, memory: bool = True,
              progress: bool = True, smoke: bool = False, backend: str | None = None) -> dict:
    """The suite on ``device`` (every batch size of ``suite.images`` unless ``batches`` says which); returns
    ``{"environment", "settings", "rows", "load_average_end"}``. ``backend``: pruneattn's backend for the
    unpatched and pruneattn rows (default: the CPU path on a CPU, the Triton kernels on a GPU); ``smoke``:
    widths of 64, the suite's smoke depth and batches, one repeat, 2 new tokens."""
    import sys

    device = torch.device(device)
    if smoke:
        new_tokens, depth, text_layers, memory = 2, suite.smoke_depth, 2, False
        batches = batches or suite.smoke_batches
    batches = batches or tuple(suite.images)
    depth = depth or suite.tower_depth
    st = settings_for(device, smoke, reps, new_tokens=new_tokens)
    backend = backend or ("cpu" if device.type == "cpu" else "triton")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[{suite.stem} {time.perf_counter() - t0:7.0f} s, load {load_average()}] {msg}", file=sys.stderr,
                  flush=True)

    if device.type == "cpu":
        torch.set_num_threads(threads)
    env = environment(device)
    clock_cls, read_peak = clock_for(device), peak_reader_for(device)
    model = suite.build(depth, text_layers, st.dtype, smoke).to(device)
    rows = []
    for batch in batches:
        inputs = suite.prompt(suite, model, suite.images[batch], st.dtype, device)
        cands = candidates(model, inputs, backend=backend)
        if st.warmup and batch == batches[0]:  # one-time costs (kernel compilation, first allocations)
            for c in cands:
                c.generate(2)
        log(f"batch {batch}: memory runs")
        peaks = {c.name: read_peak(lambda c=c: c.generate(2)) for c in cands} if memory else {}
        samples = time_candidates({c.name: c for c in cands}, clock_cls, reps=st.reps, decode_reps=st.decode_reps,
                                  new_tokens=st.new_tokens, log=lambda m: log(f"batch {batch}: {m}"))
        rows += _rows(suite, model, batch, inputs, cands, samples, peaks, env, st.dtype)
        log(f"batch {batch}: done")
    text = model.config.get_text_config()
    settings = {"dtype": str(st.dtype).replace("torch.", ""), "ttft_reps": st.reps, "decode_reps": st.decode_reps,
                "new_tokens": 1 + st.new_tokens, "smoke": smoke, "warmup": st.warmup, "backend": backend,
                "tower_blocks": depth, "tower_full_attention": suite.full_attention(depth),
                "language_model_layers": text.num_hidden_layers,
                "threads": threads if device.type == "cpu" else None,
                "memory_run": "generate of 2 new tokens (prefill + one decode step)"}
    return {"environment": env, "settings": settings, "rows": rows, "load_average_end": load_average()}


def _rows(suite, model, batch, inputs, cands, samples, peaks, env, dtype) -> list[dict]:
    base_prefill, base_decode = suite.flop_bounds(suite, model, inputs, None)
    eager_kept = {c.rate: c.kept_units() for c in cands if c.eager}
    base_ttft = _stats(samples["unpatched"]["ttft"])["median_s"]
    base_cpu = _stats(samples["unpatched"]["ttft_cpu"])["median_s"]
    base_step = _stats(samples["unpatched"]["steps"])["median_s"]
    rows = []
    for c in cands:
        s = samples[c.name]
        ttft, step, cpu = _stats(s["ttft"]), _stats(s["steps"]), _stats(s["ttft_cpu"])["median_s"]
        prefill, decode = suite.flop_bounds(suite, model, inputs, c.rate)
        bound = base_prefill / prefill
        speedup = base_ttft / ttft["median_s"]
        rows.append({
            "batch": batch, "images": " + ".join(f"{h}x{w}" for h, w in suite.images[batch]), "config": c.name,
            "image_tokens_to_lm": suite.image_tokens(inputs, c.rate),
            "ttft_ms": 1e3 * ttft["median_s"], "ttft_q1_ms": 1e3 * ttft["q1_s"], "ttft_q3_ms": 1e3 * ttft["q3_s"],
            "ttft_speedup": speedup, "ttft_flop_bound": bound, "bound_fraction": speedup / bound,
            "ttft_cpu_s": cpu, "bound_fraction_cpu": base_cpu / cpu / bound,
            "decode_ms_per_step": 1e3 * step["median_s"], "decode_tok_s": batch / step["median_s"],
            "decode_speedup": base_step / step["median_s"], "decode_flop_bound": base_decode / decode,
            "peak_mb": peaks.get(c.name, float("nan")),
            "prefill_gflop": prefill / 1e9, "ttft_reps": ttft["n"], "decode_steps": step["n"],
            "same_kept_as_eager": None if c.rate is None else bool(torch.equal(c.kept_units(), eager_kept[c.rate])),
            "device": env["device"], "dtype": str(dtype).replace("torch.", ""),
        })
    return rows


# ----------------------------------------------------------------------------- targets

TARGETS = {"ttft_bound_fraction": 0.90}


def checks(rows: list[dict]) -> list[dict]:
    """Per pruneattn row: TTFT >= 90% of its FLOP bound (on the wall clock, and on the process's CPU time
    where a CPU run has it: steadier on a shared machine), peak memory no higher than unpatched. Verdicts
    only; nothing asserts them."""
    unpatched = {r["batch"]: r for r in rows if r["config"] == "unpatched"}
    out = []
    for r in rows:
        if not r["config"].startswith("pruneattn"):
            continue
        un = unpatched[r["batch"]]
        c = {"batch": r["batch"], "config": r["config"], "bound_fraction": r["bound_fraction"],
             "ttft_bound_ok": r["bound_fraction"] >= TARGETS["ttft_bound_fraction"]}
        if r["bound_fraction_cpu"] == r["bound_fraction_cpu"]:  # not NaN: a CPU run
            c.update(bound_fraction_cpu=r["bound_fraction_cpu"],
                     ttft_bound_cpu_ok=r["bound_fraction_cpu"] >= TARGETS["ttft_bound_fraction"])
        c.update(peak_mb=r["peak_mb"], unpatched_peak_mb=un["peak_mb"], memory_ok=r["peak_mb"] <= un["peak_mb"])
        out.append(c)
    return out
