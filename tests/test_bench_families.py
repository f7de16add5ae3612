"""The model benchmarks' FLOP count and block halves for the modern families (RoPE ViT, CLIP encoder)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pruneattn.bench import models as M

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """Attention as plain matmuls, so that FlopCounterMode sees Q K^T and P V."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    if hasattr(model, "config"):
        model.config._attn_implementation = "eager"
    return model


@pytest.mark.parametrize(("name", "img_size"), [("vit_small_patch16_rope_224", 64), ("hf:clip_vit_b16", 64)])
def test_flop_count_matches_torch_flop_counter(name, img_size):
    model = _eager(M.build(name, M.UNPATCHED, img_size=img_size))
    shape = M.model_shape(model)
    assert shape["num_patches"] == (img_size // 16) ** 2 and shape["num_prefix"] == 1
    x = M.images(2, img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    assert fc.get_total_flops() == 2 * M.model_flops(shape, M.UNPATCHED)


@pytest.mark.parametrize("name", ["hf:dinov3_vits16", "hf:siglip2_b16_naflex"])
def test_flop_count_of_registers_rotary_and_padded_batches(name):
    """DINOv3 (4 registers, rotary) and SigLIP2 NaFlex (a padded batch of images of different sizes): the
    unpatched count equals torch's FlopCounterMode; the pruned schedule is as wide as the image that keeps
    most, each image keeping ceil(0.7 * its own real patches)."""
    model = _eager(M.build(name, M.UNPATCHED, img_size=64))
    model.use_head = False  # SigLIP2's attention-pooling head (one query) is left out of the count
    shape = M.model_shape(model)
    x = M.inputs(name, 3, 64)
    shape["lengths"] = M.lengths_of(x)
    assert shape["num_patches"] == 16 and shape["num_prefix"] == (5 if "dinov3" in name else 0)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*x)
    # SigLIP2 resizes its position embeddings per image with a small matmul (not counted either)
    resize = sum(fc.get_flop_counts().get(f"{type(model).__name__}.embeddings", {}).get(op, 0)
                 for op in (torch.ops.aten.mm,))
    assert fc.get_total_flops() - resize == 3 * M.model_flops(shape, M.UNPATCHED)
    config = M.pruned("var", 0.7, layers=(1, 2))
    patched = M.build(name, config, img_size=64)
    M.check_tokens(patched, config, shape, x)  # raises unless the model runs the counted schedule
    if shape["lengths"]:
        real = shape["lengths"]
        assert len(set(real)) > 1  # images of different sizes
        widths = [m for _, m in M.token_schedule(shape, config)]
        assert widths[1] == max(max(1, -(-7 * p // 10)) for p in real)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_small_patch16_rope_224", "hf:clip_vit_b16"])
def test_block_halves_are_the_first_block(name):
    """The halves the block-time bound times compose to the model's own first block."""
    model = M.build(name, M.UNPATCHED, img_size=64)
    attn_half, mlp_half = M.block_halves(model)
    x = torch.randn(2, 17, M.model_shape(model)["dim"])
    with torch.no_grad():
        if name.startswith("hf:"):
            want = model.encoder.layers[0](x, None)
            want = want[0] if isinstance(want, tuple) else want
        elif getattr(model, "rope", None) is not None:
            want = model.blocks[0](x, rope=model.rope.get_embed())
        else:
            want = model.blocks[0](x)
        assert torch.allclose(mlp_half(attn_half(x)), want, rtol=1e-5, atol=1e-5)


def test_prefix_tokens_come_from_the_registry():
    """SigLIP has no class token, DINOv2 with registers has 1 + registers: the FLOP count must know."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    assert M.model_shape(SiglipVisionModel(SiglipVisionConfig(**small)))["num_prefix"] == 0
    reg = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**small, num_register_tokens=3))
    assert M.model_shape(reg)["num_prefix"] == 4 and M.model_shape(reg)["num_patches"] == 16


def test_family_suite_runs_on_a_padded_batch():
    """``pruneattn bench --cpu-families`` plumbing: the padded SigLIP2 case times all three configurations
    with its FLOP bound (a smoke run: one repeat, no verdicts)."""
    from pruneattn.bench import models_cpu

    res = models_cpu.run_models_cpu(models_cpu.FAMILY_SMOKE_CASES, smoke=True, memory=False, progress=False,
                                    threads=1)
    rows = res["rows"]
    assert [r["config"] for r in rows] == [c.name for c in models_cpu.CONFIGS]
    assert all(r["model"] == "hf:siglip2_b16_naflex" and r["batch"] == 3 for r in rows)
    assert rows[0]["flop_bound"] == 1.0 and rows[1]["flop_bound"] > 1.0
