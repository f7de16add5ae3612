"""torch.compile of patched models: one graph, no break at the pruneattn custom ops; same outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTForImageClassification

import pruneattn
from model_reference import one_thread  # noqa: F401 (autouse fixture)


def tiny_timm() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=4)
    return pruneattn.patch(model.eval(), keep_rate=0.5, layers=(1, 2), mode="fuse")


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with pruneattn.use_backend("cpu"):
        yield
    torch._dynamo.reset()


def test_no_graph_break():
    explanation = torch._dynamo.explain(tiny_timm())(images())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inductor_matches_eager_and_records_kept_indices():
    model = tiny_timm()
    x = images()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(x)  # first: kept indices written by compiled code
        kept_compiled = pruneattn.kept_indices(model)
        eager = model(x)
        kept_eager = pruneattn.kept_indices(model)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(kept_compiled[i], kept_eager[i]) for i in kept_eager)


def test_compiled_training_step_matches_eager():
    """Backward through the custom ops' autograd inside a compiled graph (aot_eager: no codegen)."""
    model = tiny_timm().train()
    x, y = images(), torch.tensor([0, 3])
    F.cross_entropy(model(x), y).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(torch.compile(model, backend="aot_eager", fullgraph=True)(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)


def test_hf_compiles_fullgraph():
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=4,
    )
    model = pruneattn.patch(ViTForImageClassification(config).eval(), keep_rate=0.5, layers=(1,), mode="fuse")
    x = images()
    with torch.no_grad():
        eager = model(x).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
