"""``pruneattn bench --vlm-qwen3``: a Qwen3-VL-2B-shaped model in the suite of :mod:`pruneattn.bench.vlm_qwen`.

The model (random weights from configs): Qwen3-VL-2B's vision tower (width 1024, 16 heads of 64, GELU MLP
4096, 16 px patches, learned position embeddings, 2 x 2 merger to 2048, full attention in every block,
DeepStack mergers after blocks 5, 11 and 17 added in the first three language-model layers) and its
language model's shape (Qwen3-1.7B: 28 layers of width 2048, 16 heads of 128, 8 KV heads, SwiGLU 6144,
vocabulary 151936, tied embeddings, interleaved M-RoPE). ``depth`` / ``text_layers`` build fewer blocks or
layers where a machine needs it (the results say how many ran; DeepStack blocks beyond the depth are
dropped). Prompts: 16 text tokens, one image, 16 text tokens; batch 1: a 448 x 448 image (196 merged
tokens); batch 2: that and an 896 x 672 one (588), left-padded.
"""
from __future__ import annotations

import torch

from pruneattn.bench.vlm_qwen import RateSuite, sharpen

DEEPSTACK = (5, 11, 17)
TOWER_DEPTH = 24
TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, pad_token_id=151643,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True})
VISION = dict(hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2048, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304)
SMOKE_TEXT = dict(TEXT, vocab_size=152000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True})
SMOKE_VISION = dict(VISION, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=64)
TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def deepstack_blocks(depth: int, smoke: bool = False) -> list[int]:
    """The DeepStack blocks a tower of ``depth`` blocks keeps (smoke: blocks 0 and 1 of its 4)."""
    return [0, 1] if smoke else [b for b in DEEPSTACK if b < depth]


def build(depth: int = TOWER_DEPTH, text_layers: int | None = None, dtype: torch.dtype = torch.float32,
          smoke: bool = False):
    """The Qwen3-VL-2B-shaped model, random weights, q / k of the tower scaled so that its scores differ
    (``smoke``: widths of 64, for the suite's plumbing test)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(SMOKE_TEXT if smoke else TEXT, **({} if text_layers is None else {"num_hidden_layers": text_layers}))
    vision = dict(SMOKE_VISION if smoke else VISION, depth=depth, deepstack_visual_indexes=deepstack_blocks(depth, smoke))
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                        **TOKENS)
    model = Qwen3VLForConditionalGeneration(cfg).eval().to(dtype)
    sharpen(model.model.visual)
    return model


def tower_flops(cfg, grids: list[tuple[int, int, int]], kept_units: list[int]) -> float:
    """Matmul FLOPs of the tower: patch embedding, every block's projections, MLP and attention over its
    image, the last block's MLP and the merger on the kept units only; the DeepStack mergers on every unit
    (they run after their blocks, before the last block decides which units stay)."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size
    patch_in = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    merger = 2 * (4 * C * 4 * C + 4 * C * D)  # per unit: 4C -> 4C -> D
    total = 0.0
    for (t, h, w), k in zip(grids, kept_units):
        n = t * h * w
        total += n * 2 * patch_in * C
        for i in range(cfg.depth):
            total += n * (2 * 4 * C * C + 2 * 2 * n * C)  # q, k, v, out; Q K^T and P V over the image
            total += (4 * k if i == cfg.depth - 1 else n) * 2 * 2 * C * I
        total += (k + len(cfg.deepstack_visual_indexes) * n // 4) * merger
    return total


def _describe(st: dict) -> str:
    depth, layers = st["tower_blocks"], st["language_model_layers"]
    tower = "all 24 blocks" if depth == TOWER_DEPTH else f"{depth} of its 24 blocks"
    lm = "all 28 layers" if layers == TEXT["num_hidden_layers"] else f"{layers} of its 28 layers"
    return (f"Qwen3-VL-2B's vision tower (width 1024, 16 heads of 64, GELU MLP 4096, 16 px patches; {tower}, "
            f"DeepStack after blocks {deepstack_blocks(depth, st['smoke'])}) and language-model shape (Qwen3-1.7B: "
            f"width 2048, 16 heads of 128, 8 KV heads, SwiGLU 6144, vocabulary 151936; {lm})")


QWEN3 = RateSuite(
    "vlm_qwen3", "Qwen3-VL-2B-shaped model: unpatched vs pruneattn vs an eager last block", build, tower_flops,
    _describe, images={1: [(448, 448)], 2: [(448, 448), (896, 672)]}, patch=16, tower_depth=TOWER_DEPTH,
)
