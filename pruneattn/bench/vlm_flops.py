"""Matmul FLOPs of a vision-language model's prefill and decode steps, exactly from its config.

Counted (2 FLOPs per multiply-add): the tower's patch embedding; each tower block's q, k, v, output
projections and MLP (2 * in * out per token) and its attention (Q K^T and P V: 4 * N^2 * d per head,
with N the tokens the block's attention sees); the projector per image token; each language-model
layer's projections and gated MLP per prompt token and its attention over the prompt (the full
L x L products, as SDPA computes them, not the causal half); the logits of the tokens actually computed
(one per sequence: ``generate`` asks for the last position's only). Norms, activations, softmaxes,
embeddings lookups and the selection itself are not matmuls and are not counted.

A pruned tower (pruneattn) runs its blocks before the feature block on all tokens, the feature
block's attention on all and its MLP on the kept ones, and every later block (LLaVA's last one, which
it computes and does not read) on the kept ones. The eager baseline runs the whole tower unpruned
and prunes between the tower and the projector.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VLMShape:
    """What the count needs from a LLaVA / PaliGemma config."""

    depth: int
    dim: int
    mlp: int
    patches: int
    prefix: int  # class token (CLIP) or none (SigLIP)
    patch_in: int  # channels * patch * patch
    feature_block: int  # the tower block whose output the projector reads
    drops_first: bool  # LLaVA "default": the class token is not projected
    projector: tuple[tuple[int, int], ...]  # (in, out) of each projector Linear
    lm_layers: int
    lm_dim: int
    lm_heads: int
    lm_kv_heads: int
    lm_head_dim: int
    lm_mlp: int
    vocab: int
    text_tokens: int


@dataclass(frozen=True)
class Pruning:
    """What a configuration does to the image tokens: ``where`` "tower" (pruneattn), "projector" (the
    eager baseline) or None (unpatched); ``tokens`` patches kept per image; ``fused`` one more token."""

    where: str | None = None
    tokens: int | None = None
    fused: bool = False


NONE = Pruning()


def shape_of(config, text_tokens: int) -> VLMShape:
    """The :class:`VLMShape` of a ``LlavaConfig`` / ``PaliGemmaConfig`` with ``text_tokens`` text tokens."""
    vc, tc = config.vision_config, config.get_text_config()
    depth = vc.num_hidden_layers
    llava = hasattr(config, "vision_feature_layer")
    if llava:
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("the FLOP count takes one vision_feature_layer (an int)")
        feature_block = layer % (depth + 1) - 1
        prefix = 1
        drops_first = config.vision_feature_select_strategy == "default"
        projector = ((vc.hidden_size, tc.hidden_size), (tc.hidden_size, tc.hidden_size))
    else:
        feature_block, prefix, drops_first = depth - 1, 0, False
        projector = ((vc.hidden_size, config.projection_dim),)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return VLMShape(
        depth=depth, dim=vc.hidden_size, mlp=vc.intermediate_size, patches=(vc.image_size // vc.patch_size) ** 2,
        prefix=prefix, patch_in=vc.num_channels * vc.patch_size**2, feature_block=feature_block,
        drops_first=drops_first, projector=projector, lm_layers=tc.num_hidden_layers, lm_dim=tc.hidden_size,
        lm_heads=tc.num_attention_heads, lm_kv_heads=tc.num_key_value_heads, lm_head_dim=head_dim,
        lm_mlp=tc.intermediate_size, vocab=tc.vocab_size, text_tokens=text_tokens,
    )


def tower_schedule(s: VLMShape, p: Pruning) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of each tower block, per image."""
    full = s.prefix + s.patches
    if p.where != "tower":
        return [(full, full)] * s.depth
    kept = s.prefix + p.tokens + int(p.fused)
    return [(full, full) if i < s.feature_block else (full, kept) if i == s.feature_block else (kept, kept)
            for i in range(s.depth)]


def tower_block_flops(s: VLMShape, n_attn: int, n_mlp: int) -> int:
    return 2 * n_attn * 4 * s.dim * s.dim + 4 * n_attn * n_attn * s.dim + 2 * n_mlp * 2 * s.dim * s.mlp


def tower_flops(s: VLMShape, p: Pruning = NONE) -> int:
    """Per image: patch embedding + every block at the token counts it sees."""
    embed = 2 * s.patches * s.patch_in * s.dim
    return embed + sum(tower_block_flops(s, a, m) for a, m in tower_schedule(s, p))


def image_tokens(s: VLMShape, p: Pruning = NONE) -> int:
    """Tokens per image that the projector and the language model read."""
    if p.where is None:
        return s.patches + s.prefix - int(s.drops_first)
    if p.where == "projector":
        return p.tokens
    return p.tokens + int(p.fused) + s.prefix - int(s.drops_first)


def prompt_tokens(s: VLMShape, p: Pruning = NONE) -> int:
    """The language model's prompt length (one image + the text)."""
    return s.text_tokens + image_tokens(s, p)


def projector_flops(s: VLMShape, n: int) -> int:
    return sum(2 * n * i * o for i, o in s.projector)


def lm_flops(s: VLMShape, new: int, context: int, logits: int = 1) -> int:
    """``new`` tokens through the language model, each attending over ``context`` keys (the full product),
    plus ``logits`` rows of the output head."""
    q = s.lm_heads * s.lm_head_dim
    kv = s.lm_kv_heads * s.lm_head_dim
    linear = 2 * new * (s.lm_dim * q + 2 * s.lm_dim * kv + q * s.lm_dim + 3 * s.lm_dim * s.lm_mlp)
    attention = 4 * new * context * q
    return s.lm_layers * (linear + attention) + 2 * logits * s.lm_dim * s.vocab


def prefill_flops(s: VLMShape, p: Pruning = NONE) -> int:
    """One sequence's prefill: tower, projector, language model over the prompt, the last token's logits."""
    n = image_tokens(s, p)
    L = prompt_tokens(s, p)
    return tower_flops(s, p) + projector_flops(s, n) + lm_flops(s, L, L, 1)


def decode_flops(s: VLMShape, p: Pruning = NONE, steps: int = 32) -> float:
    """Mean FLOPs of one sequence's decode step over ``steps`` steps after the prefill (step t attends over
    the prompt and t tokens)."""
    L = prompt_tokens(s, p)
    return sum(lm_flops(s, 1, L + t, 1) for t in range(1, steps + 1)) / steps


def bound(s: VLMShape, p: Pruning, what: str = "prefill", steps: int = 32) -> float:
    """FLOPs(unpatched) / FLOPs(configuration): the speed-up of a time-proportional-to-FLOPs implementation."""
    if what == "prefill":
        return prefill_flops(s, NONE) / prefill_flops(s, p)
    return decode_flops(s, NONE, steps) / decode_flops(s, p, steps)
