"""The vision-language models of ``pruneattn bench --vlm``, built from configs with random weights (no hub).

- ``llava-1.5``: LLaVA-1.5's tower, CLIP ViT-L/14 at 336 px (24 blocks, width 1024, 16 heads, MLP 4096,
  577 tokens, quick_gelu), ``vision_feature_layer=-2``, strategy "default", with a language model of
  Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936, tied embeddings).
- ``paligemma-224``: PaliGemma-224's tower, SigLIP So400m/14 at 224 px (27 blocks, width 1152, 16 heads,
  MLP 4304, 256 tokens, no head), with a Gemma-shaped language model of about 0.5 B parameters (hidden
  1024, 18 layers, 8 heads, 1 KV head, head dim 128, MLP 4096; PaliGemma's own vocabulary of 257216 tied
  to the embeddings: 0.26 B of the 0.53 B).
- ``tiny-llava`` / ``tiny-paligemma``: the same classes with 0.1 M parameters (tower head dim 16, the
  smallest the Triton kernels take), for ``--smoke`` and the tests.

Every tower's ``q_proj`` (weight and bias) is scaled by ``q_scale`` (4): with random weights the
attention is otherwise nearly uniform and every patch scores about alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class VLMCase:
    """One model of the suite: its configs, prompt shape, the token counts and batches it is run at."""

    name: str
    family: str  # "llava" or "paligemma"
    vision: dict
    text: dict
    image_token_id: int
    tokens: tuple[int, ...]  # patches kept per image (pruneattn and the eager baseline)
    batches: tuple[int, ...] = (1, 4)
    text_tokens: int = 32  # text tokens of the prompt, besides the image placeholders
    extra: dict = field(default_factory=dict)  # more LlavaConfig / PaliGemmaConfig keywords
    q_scale: float = 4.0

    @property
    def placeholders(self) -> int:
        """Image placeholders per image in the processor's prompt (the unpruned count)."""
        patches = (self.vision["image_size"] // self.vision["patch_size"]) ** 2
        return patches  # LLaVA "default" drops the class token; SigLIP has none

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]


LLAVA = VLMCase(
    "llava-1.5", "llava",
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, hidden_act="quick_gelu"),
    text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
              rope_theta=1e6),
    image_token_id=151646, tokens=(192, 128, 64),
)
PALIGEMMA = VLMCase(
    "paligemma-224", "paligemma",
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=224, patch_size=14, vision_use_head=False),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=8,
              num_key_value_heads=1, head_dim=128, vocab_size=257216, tie_word_embeddings=True),
    image_token_id=257152, tokens=(192, 128, 64), extra=dict(projection_dim=1024),
)
TINY_LLAVA = VLMCase(
    "tiny-llava", "llava",
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                image_size=32, patch_size=8, hidden_act="quick_gelu"),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
    image_token_id=127, tokens=(8, 4), batches=(1, 2), text_tokens=6,
)
TINY_PALIGEMMA = VLMCase(
    "tiny-paligemma", "paligemma",
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                image_size=32, patch_size=8, vision_use_head=False),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=8, vocab_size=128, tie_word_embeddings=True),
    image_token_id=127, tokens=(8, 4), batches=(1, 2), text_tokens=6, extra=dict(projection_dim=32),
)
CASES = (LLAVA, PALIGEMMA)
SMOKE_CASES = (TINY_LLAVA, TINY_PALIGEMMA)


def config(case: VLMCase):
    """The transformers config of ``case`` (SDPA everywhere)."""
    import transformers

    if case.family == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**case.vision), text_config=transformers.Qwen2Config(**case.text),
            image_token_id=case.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_seq_length=case.placeholders, pad_token_id=0, **case.extra)
    elif case.family == "paligemma":
        cfg = transformers.PaliGemmaConfig(
            vision_config=transformers.SiglipVisionConfig(**case.vision), text_config=transformers.GemmaConfig(**case.text),
            image_token_id=case.image_token_id, pad_token_id=0, **case.extra)
        cfg.vision_config.projection_dim = cfg.text_config.hidden_size  # the projector maps the tower to the LM
        cfg.vision_config.vision_use_head = False
    else:
        raise ValueError(f"unknown family {case.family!r}")
    cfg._attn_implementation = "sdpa"
    return cfg


def build(case: VLMCase, device="cpu", dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    """``case``'s generation model with random weights (seeded), tower ``q_proj`` scaled, eval mode."""
    import transformers

    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "paligemma": transformers.PaliGemmaForConditionalGeneration}[case.family]
    torch.manual_seed(seed)
    model = cls(config(case)).eval()
    with torch.no_grad():
        for layer in tower_layers(model):
            layer.self_attn.q_proj.weight.mul_(case.q_scale)
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.mul_(case.q_scale)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.to(device=device, dtype=dtype)


def tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.vision_tower


def tower_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    t = tower(model)
    return (t.encoder if hasattr(t, "encoder") else t.vision_model.encoder).layers


def prompt(case: VLMCase, batch: int, image_tokens: int | None = None, device="cpu", dtype=torch.float32,
           seed: int = 0) -> dict:
    """Processor-style inputs: one image per prompt with ``image_tokens`` placeholders (default: the full
    count), ``case.text_tokens`` random text tokens (LLaVA: a few before the image, the rest after;
    PaliGemma: the image first, as its processor puts it), no padding."""
    n = case.placeholders if image_tokens is None else image_tokens
    g = torch.Generator().manual_seed(seed)
    vocab = case.text["vocab_size"]
    low = min(1000, vocab // 4)
    text = torch.randint(low, min(vocab, case.image_token_id) - 1, (batch, case.text_tokens), generator=g)
    image = torch.full((batch, n), case.image_token_id)
    before = 0 if case.family == "paligemma" else min(4, case.text_tokens)
    ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if case.family == "paligemma":
        inputs["token_type_ids"] = torch.zeros_like(ids).to(device)  # all prefix (no suffix at inference)
    pixels = torch.randn(batch, 3, case.image_size, case.image_size, generator=g)
    inputs["pixel_values"] = pixels.to(device=device, dtype=dtype)
    return inputs


def num_parameters(model: torch.nn.Module) -> dict:
    """Parameters (shared ones once) of the tower, the projector and the language model (+ head)."""
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    vision = count(tower(model))
    projector = count(model.model.multi_modal_projector)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"tower": vision, "projector": projector, "language_model": total - vision - projector, "total": total}
