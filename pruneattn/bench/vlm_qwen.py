"""``pruneattn bench --vlm-qwen``: a Qwen2.5-VL-shaped model, unpatched vs pruneattn vs an eager last block.

The model (random weights from configs): Qwen2.5-VL's vision tower block shape (width 1280, 16 heads of 80,
SwiGLU 3420, 14 px patches, 112 px windows, 2 x 2 merger), with ``TOWER_DEPTH`` blocks instead of 32 on a
CPU (full attention in every fourth block, the last one included, as in the real tower), and a
Qwen2.5-0.5B-shaped language model (24 layers of width 896, 14 heads, 2 KV heads, vocabulary 151936).
Prompts: 16 text tokens, one image, 16 text tokens; batch 1: a 448 x 448 image (256 merged tokens);
batch 2: that and a 672 x 448 one (384), left-padded.

Configurations: ``unpatched``; ``pruneattn r`` (``pruneattn.patch(model, keep_rate=r)``: each image keeps
ceil(r * units) merged units, scored in the tower's last block by the fused attention); ``eager last block
r``: the same pruning with the last block's attention computed by the eager reference, which builds the
N x N weights of each image as published pruning code does to read them (same kept units, same prompt
handling: only the scoring attention differs).

Metrics (one ``generate`` call each, a logits processor marking each step): time to first token (the tower
included), decode time per step over the next tokens, peak bytes of torch's CPU allocator during a
prefill and one decode step. Repeats interleave the configurations. Beside each row: the matmul FLOP
bound of the prefill (tower + language model) and of a decode step, unpatched over the configuration.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pruneattn.bench.meta import environment, load_average
from pruneattn.bench.vlm import WallClock, _stats, shared_copy, time_candidates
from pruneattn.patch.options import Amount
from pruneattn.patch.vlm.tokens import ImageTokens

TOWER_DEPTH = 8
TEXT = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, pad_token_id=151643, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                         "mrope_section": [8, 12, 12]})
IMAGE, VISION_START, VISION_END = 151655, 151652, 151653
IMAGES = {1: [(448, 448)], 2: [(448, 448), (672, 448)]}  # (height, width) per batch size
TEXT_TOKENS = 16  # before and after the image
RATES = (0.25, 0.125)


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
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * width].mul_(2.0)
    return model


def prompt(images: list[tuple[int, int]], dtype: torch.dtype = torch.float32) -> dict:
    """What the processor returns for one image per prompt: left-padded ids with a placeholder per merged
    token, attention mask, token types, patches and grids."""
    g = torch.Generator().manual_seed(1)
    grids = [(1, h // 14, w // 14) for h, w in images]
    rows = []
    for t, h, w in grids:
        text = torch.randint(1000, 100000, (2 * TEXT_TOKENS,), generator=g).tolist()
        rows.append(text[:TEXT_TOKENS] + [VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END] + text[TEXT_TOKENS:])
    L = max(map(len, rows))
    ids = torch.tensor([[TEXT["pad_token_id"]] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, 3 * 2 * 14 * 14, generator=g).to(dtype)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int(), pixel_values=pixels,
                image_grid_thw=torch.tensor(grids))


# ----------------------------------------------------------------------------- FLOP bounds


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


def lm_flops(cfg, tokens: int, context: int, new: int) -> float:
    """Matmul FLOPs of ``new`` tokens of the language model after ``context`` cached ones (``tokens``:
    how many rows; logits for the last one only, as ``generate`` asks)."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * H // cfg.num_attention_heads
    per_token = 2 * (2 * H * H + 2 * H * kv + 3 * H * I)
    attention = 2 * 2 * H * (context + (new + 1) / 2)
    return tokens * L * (per_token + attention) + 2 * H * V


def kept_units(inputs: dict, rate: float | None) -> tuple[list[int], list[int]]:
    """(units, kept units) of each image of the batch, unpruned (``rate`` None) or at ``rate`` (the count the
    patched model and a planning processor use)."""
    units = [t * h * w // 4 for t, h, w in inputs["image_grid_thw"].tolist()]
    tokens = ImageTokens((Amount(1.0 if rate is None else rate),))
    return units, [tokens.kept(u) for u in units]


def flop_bounds(model, inputs: dict, rate: float | None) -> tuple[float, float]:
    """(prefill, decode step) FLOPs of the batch, unpruned (``rate`` None) or at ``rate``."""
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    units, kept = kept_units(inputs, rate)
    real = inputs["attention_mask"].sum(1).tolist()
    rows = [r - (u - k) for r, u, k in zip(real, units, kept)]
    text = model.config.text_config
    prefill = _tower_flops(model.config.vision_config, grids, kept) + sum(lm_flops(text, r, 0, r) for r in rows)
    decode = sum(lm_flops(text, 1, r, 1) for r in rows)
    return prefill, decode


# ----------------------------------------------------------------------------- runs


@dataclass
class Candidate:
    """One configuration on one batch; ``generate(new_tokens, clock)`` as the other VLM suite's."""

    name: str
    model: torch.nn.Module
    inputs: dict
    rate: float | None
    eager: bool = False

    def generate(self, new_tokens: int, clock=None, first: bool = False) -> torch.Tensor:
        import pruneattn
        from transformers import LogitsProcessorList

        from pruneattn.bench.vlm import _step_marks

        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if clock is not None:
            kw["logits_processor"] = LogitsProcessorList([_step_marks(clock)])
            clock.mark()
        # the eager baseline: the pruning block's attention by the reference (N x N weights), on the CPU
        with torch.no_grad(), pruneattn.use_backend("reference" if self.eager else "cpu"):
            return self.model.generate(**self.inputs, **kw)

    def kept_units(self) -> torch.Tensor | None:
        """The units the last call kept per image (-1 padded), or None (unpatched)."""
        import pruneattn

        return None if self.rate is None else next(reversed(pruneattn.kept_indices(self.model).values()))


def candidates(model, inputs: dict, rates=RATES) -> list[Candidate]:
    import pruneattn

    out = [Candidate("unpatched", model, inputs, None)]
    for r in rates:
        out.append(Candidate(f"pruneattn {r}", pruneattn.patch(shared_copy(model), keep_rate=r), inputs, r))
    for r in rates:
        out.append(Candidate(f"eager last block {r}", pruneattn.patch(shared_copy(model), keep_rate=r), inputs, r,
                             eager=True))
    return out


@dataclass(frozen=True)
class RateSuite:
    """What the keep-rate suites need from one model family (``--vlm-qwen``, ``--vlm-internvl``)."""

    images: dict[int, list[tuple[int, int]]]  # per batch size: each prompt's image, (height, width) in pixels
    prompt: Callable[[list[tuple[int, int]]], dict]  # the processor-style inputs of those images
    flop_bounds: Callable[[torch.nn.Module, dict, float | None], tuple[float, float]]  # (prefill, decode step)
    image_tokens: Callable[[dict, float | None], int]  # image tokens the language model reads, all prompts


def run_rates(suite: RateSuite, model: torch.nn.Module, *, reps: int, new_tokens: int, batches, memory: bool,
              log: Callable[[str], None]) -> list[dict]:
    """Unpatched, pruneattn and the eager last block at each rate, on each batch: one row per configuration
    (memory runs first, then interleaved timed repeats)."""
    from pruneattn.bench.models_cpu import allocator_peak_of

    rows = []
    for batch in batches:
        inputs = suite.prompt(suite.images[batch])
        cands = candidates(model, inputs)
        log(f"batch {batch}: memory runs")
        peaks = {c.name: allocator_peak_of(lambda c=c: c.generate(2)) for c in cands} if memory else {}
        samples = time_candidates({c.name: c for c in cands}, WallClock, reps=reps, decode_reps=1,
                                  new_tokens=new_tokens, log=lambda m: log(f"batch {batch}: {m}"))
        base_prefill, base_decode = suite.flop_bounds(model, inputs, None)
        eager_kept = {c.rate: c.kept_units() for c in cands if c.eager}
        base_ttft = _stats(samples["unpatched"]["ttft"])["median_s"]
        base_step = _stats(samples["unpatched"]["steps"])["median_s"]
        for c in cands:
            s = samples[c.name]
            ttft, step = _stats(s["ttft"]), _stats(s["steps"])
            prefill, decode = suite.flop_bounds(model, inputs, c.rate)
            bound = base_prefill / prefill
            speedup = base_ttft / ttft["median_s"]
            rows.append({
                "batch": batch, "images": " + ".join(f"{h}x{w}" for h, w in suite.images[batch]), "config": c.name,
                "image_tokens_to_lm": suite.image_tokens(inputs, c.rate),
                "ttft_ms": 1e3 * ttft["median_s"], "ttft_q1_ms": 1e3 * ttft["q1_s"], "ttft_q3_ms": 1e3 * ttft["q3_s"],
                "ttft_speedup": speedup, "ttft_flop_bound": bound, "bound_fraction": speedup / bound,
                "ttft_cpu_s": _stats(s["ttft_cpu"])["median_s"],
                "decode_ms_per_step": 1e3 * step["median_s"], "decode_tok_s": batch / step["median_s"],
                "decode_speedup": base_step / step["median_s"], "decode_flop_bound": base_decode / decode,
                "peak_mb": peaks.get(c.name, float("nan")),
                "prefill_gflop": prefill / 1e9, "ttft_reps": ttft["n"], "decode_steps": step["n"],
                "same_kept_as_eager": None if c.rate is None else bool(torch.equal(c.kept_units(), eager_kept[c.rate])),
            })
        log(f"batch {batch}: done")
    return rows


def progress_log(name: str, progress: bool) -> Callable[[str], None]:
    """A logger of timestamped progress lines on stderr (silent without ``progress``)."""
    import sys

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[{name} {time.perf_counter() - t0:7.0f} s, load {load_average()}] {msg}", file=sys.stderr,
                  flush=True)

    return log


def run_suite(name: str, suite: RateSuite, model: torch.nn.Module, about: dict, *, reps: int, new_tokens: int,
              threads: int, batches, memory: bool, progress: bool, smoke: bool) -> dict:
    """:func:`run_rates` on ``threads`` threads; returns ``{"environment", "settings", "rows",
    "load_average_end"}``, the settings with ``about`` (what the model is) added."""
    torch.set_num_threads(threads)
    env = environment("cpu")
    rows = run_rates(suite, model, reps=reps, new_tokens=new_tokens, batches=batches, memory=memory,
                     log=progress_log(name, progress))
    settings = {"dtype": "float32", "ttft_reps": reps, "decode_reps": 1, "new_tokens": 1 + new_tokens,
                "smoke": smoke, **about, "threads": threads,
                "memory_run": "generate of 2 new tokens (prefill + one decode step)"}
    return {"environment": env, "settings": settings, "rows": rows, "load_average_end": load_average()}


QWEN = RateSuite(IMAGES, prompt, flop_bounds, lambda inputs, rate: sum(kept_units(inputs, rate)[1]))


def run_vlm_qwen(*, reps: int = 3, new_tokens: int = 16, threads: int = 2, depth: int = TOWER_DEPTH,
                 text_layers: int | None = None, batches=(1, 2), memory: bool = True, progress: bool = True,
                 smoke: bool = False) -> dict:
    """The suite (see :func:`run_suite`; ``smoke``: widths of 64, one repeat, 2 new tokens)."""
    if smoke:
        reps, new_tokens, depth, text_layers, memory = 1, 2, 4, 2, False
    about = {"tower_blocks": depth, "tower_full_attention": list(range(3, depth, 4)),
             "language_model_layers": text_layers or TEXT["num_hidden_layers"]}
    return run_suite("vlm-qwen", QWEN, build(depth, text_layers, smoke=smoke), about, reps=reps, new_tokens=new_tokens,
                     threads=threads, batches=batches, memory=memory, progress=progress, smoke=smoke)
