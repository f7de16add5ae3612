"""``pruneattn bench --vlm-internvl``: an InternVL3-1B-shaped model, unpatched vs pruneattn vs an eager last block.

The model (random weights from configs): InternVL3-1B's vision tower block shape (InternViT-300M: width
1024, 16 heads of 64, MLP 4096, 448 px tiles of 14 px patches, a class token, layer scale), with
``TOWER_DEPTH`` blocks instead of 24 on a CPU, its 2 x 2 pixel shuffle and projector (4096 -> 896 -> 896), and
a Qwen2.5-0.5B-shaped language model (24 layers of width 896, 14 heads, 2 KV heads, vocabulary 151674).
Each prompt: 16 text tokens, one image of two 448 px tiles (a crop and the thumbnail, 2 x 256 image
tokens between ``<img>`` and ``</img>``), 16 text tokens; batch 1 and 4.

Configurations, timing, memory and bounds as ``--vlm-qwen`` (:mod:`pruneattn.bench.vlm_qwen`): each tile keeps
ceil(r * 256) of its 2 x 2 units, scored in the tower's last block (the feature layer) by the fused attention
(``pruneattn r``) or with the N x N weights of the reference (``eager last block r``).
"""
from __future__ import annotations

import torch

from pruneattn.bench.vlm_qwen import RateSuite, lm_flops
from pruneattn.patch.options import Amount
from pruneattn.patch.vlm.tokens import ImageTokens

TOWER_DEPTH = 8
VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=[448, 448],
              patch_size=[14, 14], use_qk_norm=False, layer_scale_init_value=0.1, norm_type="layer_norm",
              use_mean_pooling=True)
TEXT = dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, pad_token_id=151643, tie_word_embeddings=True, rope_theta=1e6)
IMAGE, START, END = 151667, 151665, 151666
TILES = 2  # a 448 px crop and the thumbnail per image
UNITS = 256  # per tile: (448 / 14 / 2) ** 2
IMAGES = {1: [(448, 896)], 4: [(448, 896)] * 4}  # one image per prompt, two tiles each (batch 1 and 4)
TEXT_TOKENS = 16  # before and after the image
SMOKE_VISION = dict(VISION, hidden_size=64, intermediate_size=128, num_attention_heads=4)
SMOKE_TEXT = dict(TEXT, vocab_size=151700, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def build(depth: int = TOWER_DEPTH, text_layers: int | None = None, dtype: torch.dtype = torch.float32,
          smoke: bool = False) -> torch.nn.Module:
    """The InternVL3-1B-shaped model, random weights, the tower's q scaled so that its scores differ
    (``smoke``: widths of 64, for the suite's plumbing test)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(0)
    text = dict(SMOKE_TEXT if smoke else TEXT, **({} if text_layers is None else {"num_hidden_layers": text_layers}))
    vision = InternVLVisionConfig(**(SMOKE_VISION if smoke else VISION), num_hidden_layers=depth)
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_id=IMAGE,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = InternVLForConditionalGeneration(cfg).eval().to(dtype)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_proj.weight.mul_(4.0)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def prompt(suite: RateSuite, model, images: list[tuple[int, int]], dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> dict:
    """What the processor returns for one image of two tiles per prompt: ids with ``<img>``, 256
    placeholders per tile and ``</img>``, the attention mask and the tiles' pixels."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in images:
        text = torch.randint(1000, 100000, (2 * TEXT_TOKENS,), generator=g).tolist()
        rows.append(text[:TEXT_TOKENS] + [START] + [IMAGE] * (TILES * UNITS) + [END] + text[TEXT_TOKENS:])
    ids = torch.tensor(rows)
    pixels = torch.randn(len(images) * TILES, 3, 448, 448, generator=g).to(dtype)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    return {k: v.to(device) for k, v in out.items()}


def kept_per_tile(rate: float | None) -> int:
    """Image tokens a tile yields, unpruned (``rate`` None) or at ``rate`` (the patched model's count)."""
    return ImageTokens((Amount(1.0 if rate is None else rate),)).kept(UNITS)


def tower_flops(vc, width: int, tiles: int, kept: int) -> float:
    """Matmul FLOPs of the tower over ``tiles`` tiles: patch embedding, every block's projections, attention
    and MLP (the last block's MLP on the class token and the kept units' patches), the projector to the
    language model's ``width``."""
    C, I = vc.hidden_size, vc.intermediate_size
    n = 1 + 4 * UNITS  # the class token and the patches
    embed = 2 * 4 * UNITS * 3 * 14 * 14 * C
    blocks = vc.num_hidden_layers * (2 * n * 4 * C * C + 4 * n * n * C) + 2 * 2 * C * I * (
        (vc.num_hidden_layers - 1) * n + 1 + 4 * kept)
    return tiles * (embed + blocks + kept * 2 * (4 * C * width + width * width))


def flop_bounds(suite: RateSuite, model: torch.nn.Module, inputs: dict, rate: float | None) -> tuple[float, float]:
    """(prefill, decode step) FLOPs of the batch, unpruned (``rate`` None) or at ``rate``."""
    kept = kept_per_tile(rate)
    prompts = inputs["input_ids"].shape[0]
    tokens = inputs["input_ids"].shape[1] - TILES * (UNITS - kept)
    text = model.config.text_config
    tower = tower_flops(model.config.vision_config, text.hidden_size, prompts * TILES, kept)
    prefill = tower + prompts * lm_flops(text, tokens, 0, tokens)
    return prefill, prompts * lm_flops(text, 1, tokens, 1)


def _describe(st: dict) -> str:
    return (f"InternVL3-1B's tower block shape (InternViT-300M: width 1024, 16 heads of 64, 448 px tiles) with "
            f"{st['tower_blocks']} blocks instead of 24, {TILES} tiles per image (a crop and the thumbnail), its 2 x 2 "
            f"pixel shuffle and projector, a {st['language_model_layers']}-layer Qwen2.5-0.5B-shaped language model")


INTERNVL = RateSuite(
    "vlm_internvl", "InternVL3-1B-shaped model: unpatched vs pruneattn vs an eager last block", build, None, _describe,
    images=IMAGES, patch=14, tower_depth=TOWER_DEPTH, prompt=prompt, flop_bounds=flop_bounds,
    image_tokens=lambda inputs, rate: inputs["input_ids"].shape[0] * TILES * kept_per_tile(rate),
    smoke_depth=2, smoke_batches=(1,),
)
