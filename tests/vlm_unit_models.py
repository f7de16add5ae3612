"""Tiny InternVL, Gemma 3, Mistral 3, SmolVLM and Idefics3 models (random weights, q scaled so that the
scores differ), with the ids and sizes of the offline processors in ``tests/vlm_processors.py``: 4 px patches;
InternVL, SmolVLM and Idefics3 take 32 px tiles joined 2 x 2 (16 tokens per tile), Gemma 3 64 px images
pooled 4 x 4 (16 tokens per image), Mistral 3 images of any size up to 32 px merged 2 x 2."""
from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2Config,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

UNIT_KINDS = ("internvl", "gemma3", "mistral3", "smolvlm", "idefics3")
IMAGE_TOKEN = {"internvl": 80, "gemma3": 85, "mistral3": 86, "smolvlm": 99, "idefics3": 99}
BREAK, END = 87, 88  # Mistral 3's [IMG_BREAK], [IMG_END]
SIDE = {"internvl": 2, "gemma3": 4, "mistral3": 2, "smolvlm": 2, "idefics3": 2}  # units of SIDE x SIDE patches
PATCH = 4
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100, pad_token_id=0)


def tower_of(model: torch.nn.Module) -> torch.nn.Module:
    base = model.model
    return getattr(base, "vision_tower", None) or base.vision_model


def _sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale q so that the random tower's attention (and so the scores) differ between patches."""
    with torch.no_grad():
        for name, p in tower_of(model).named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(factor)
    return model.eval()


def internvl(seed: int = 0, width: int = 32, **kw) -> torch.nn.Module:
    """``width``: of the tower (4 heads; 64 gives head dim 16, the smallest the Triton kernels take)."""
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(**{**_TOWER, "hidden_size": width}, image_size=[32, 32], patch_size=[PATCH, PATCH],
                                  use_qk_norm=True, layer_scale_init_value=1.0)
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**_TEXT), image_token_id=80,
                         downsample_ratio=0.5, **kw)
    return _sharpen(InternVLForConditionalGeneration(cfg))


def gemma3(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(**_TOWER, image_size=64, patch_size=PATCH, vision_use_head=False)
    text = Gemma3TextConfig(**{**_TEXT, "num_key_value_heads": 1}, head_dim=8, sliding_window=8)
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16, image_token_id=85,
                       boi_token_id=83, eoi_token_id=84)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # initialized to zeros: the images would not reach the language model
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    return _sharpen(model)


def mistral3(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = PixtralVisionConfig(**_TOWER, image_size=32, patch_size=PATCH, head_dim=8)
    cfg = Mistral3Config(vision_config=vision, text_config=MistralConfig(**_TEXT, head_dim=8), image_token_index=86,
                         spatial_merge_size=2)
    return _sharpen(Mistral3ForConditionalGeneration(cfg))


def tiles(kind: str, seed: int = 0) -> torch.nn.Module:
    """SmolVLM or Idefics3."""
    torch.manual_seed(seed)
    config, vision, model = ((SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration) if kind == "smolvlm"
                             else (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration))
    cfg = config(vision_config=vision(**_TOWER, image_size=32, patch_size=PATCH), text_config=LlamaConfig(**_TEXT),
                 scale_factor=2, image_token_id=99)
    return _sharpen(model(cfg))


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind in ("smolvlm", "idefics3"):
        return tiles(kind, seed)
    return {"internvl": internvl, "gemma3": gemma3, "mistral3": mistral3}[kind](seed)
