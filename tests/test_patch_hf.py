"""pruneattn.patch on Hugging Face ViT / DeiT models (built from small configs, no hub access)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.vit.modeling_vit import ViTLayer

import pruneattn
from model_reference import hf_forward, kernel_device, one_thread, token_counts  # noqa: F401 (fixtures)
from pruneattn.patch.hf import PrunedLayer
from pruneattn.patch.swap import derived_class, original_class
from pruneattn.validate import MODES, QUERIES

PrunedViTLayer = derived_class(PrunedLayer, ViTLayer)
PrunedDeiTLayer = derived_class(PrunedLayer, DeiTLayer)

FP64_TOL = 1e-6  # float32 scores / fuse weights by the spec (see test_patch_timm)
SMALL = dict(
    hidden_size=64, num_hidden_layers=6, num_attention_heads=2, intermediate_size=128,
    image_size=32, patch_size=8, num_labels=10,
)  # 16 patches, head dim 32


def build(cls, config_cls=ViTConfig, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(config_cls(**{**SMALL, **kw})).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_vit_keep_rate_one_matches_unpatched(kernel_device):
    """Default backend (Triton kernels; interpreter on CPU) with nothing dropped: same logits."""
    model = build(ViTForImageClassification).to(kernel_device)
    x = images().to(kernel_device)
    with torch.no_grad():
        ref = model(x).logits
        pruneattn.patch(model, keep_rate=1.0, layers=(1, 4))
        assert type(model.vit.layers[1]) is PrunedViTLayer
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassificationWithTeacher])
def test_keep_rate_one_cpu_matches_unpatched(cpu_backend, cls):
    config_cls = DeiTConfig if cls.__name__.startswith("DeiT") else ViTConfig
    model = build(cls, config_cls)
    x = images()
    with torch.no_grad():
        ref = model(x)
        pruneattn.patch(model, keep_rate=1.0, layers=range(6))
        out = model(x)
    key = "logits" if "logits" in ref else "last_hidden_state"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("deit", [False, True])
@pytest.mark.parametrize("query", QUERIES)
def test_pruned_matches_reference(cpu_backend, mode, deit, query):
    cls, config_cls = (DeiTForImageClassification, DeiTConfig) if deit else (ViTForImageClassification, ViTConfig)
    model = build(cls, config_cls).double()
    backbone = model.deit if deit else model.vit
    prefix = 2 if deit else 1
    extra = int(mode == "fuse")
    x = images().double()
    with torch.no_grad():
        hidden, trace = hf_forward(backbone, x, {1: 0.5, 3: 0.7}, stat="mad", query=query, mode=mode)
        expected = model.classifier(hidden[:, 0])
        pruneattn.patch(model, keep_rate=(0.5, 0.7), layers=(1, 3), stat="mad", query=query, mode=mode)
        seen, _ = token_counts(model, backbone.layers)
        out = model(x).logits
        kept = pruneattn.kept_indices(model)
    # 16 patches -> ceil(.5 * 16) = 8 -> ceil(.7 * 8) = 6
    assert seen == trace.tokens == [16 + prefix] + [n + prefix + extra for n in (8, 8, 6, 6, 6)]
    torch.testing.assert_close(out, expected, rtol=FP64_TOL, atol=FP64_TOL)
    assert {i: v.tolist() for i, v in kept.items()} == {i: v.tolist() for i, v in trace.kept.items()}


def test_deit_with_teacher_and_triton_kernels(kernel_device):
    """DeiT with distillation token (2 prefix tokens) through the default backend, against fp64 truth."""
    model = build(DeiTForImageClassificationWithTeacher, DeiTConfig)
    x = images()
    with torch.no_grad():
        model.double()
        hidden, trace = hf_forward(model.deit, x.double(), {2: 0.6}, mode="fuse")
        expected = (model.cls_classifier(hidden[:, 0]) + model.distillation_classifier(hidden[:, 1])) / 2
        model.float().to(kernel_device)
        pruneattn.patch(model, keep_rate=0.6, layers=(2,), mode="fuse")
        assert type(model.deit.layers[2]) is PrunedDeiTLayer
        out = model(x.to(kernel_device))
    torch.testing.assert_close(out.logits.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    assert out.logits.shape == (2, 10)
    assert torch.equal(pruneattn.kept_indices(model)[2].cpu(), trace.kept[2])


def test_vit_model_outputs_and_hidden_states(cpu_backend):
    model = build(ViTModel)
    pruneattn.patch(model, keep_rate=0.5, layers=(2,))
    with torch.no_grad():
        out = model(images(), output_hidden_states=True)
    assert out.pooler_output.shape == (2, 64)
    assert out.last_hidden_state.shape == (2, 1 + 8, 64)
    assert [h.shape[1] for h in out.hidden_states] == [17, 17, 17, 9, 9, 9, 9]


def test_unpatch_and_state_dict(cpu_backend):
    model = build(ViTForImageClassification)
    x = images()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x).logits
        pruneattn.patch(model, keep_rate=0.5, layers=(0, 2), mode="fuse")
        assert list(model.state_dict()) == keys
        assert not torch.allclose(model(x).logits, ref)
        pruneattn.patch(model, keep_rate=0.7, layers=(1,))  # re-configure, no double wrap
        assert [original_class(layer) for layer in model.vit.layers] == [ViTLayer] * 6
        assert [type(layer).__name__ for layer in model.vit.layers] == ["ViTLayer", "PrunedViTLayer"] + ["ViTLayer"] * 4
        pruneattn.unpatch(model)
        assert all(type(layer) is ViTLayer for layer in model.vit.layers)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)


def test_unsupported_hf_models_and_args():
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling"):
        pruneattn.patch(build(ViTForMaskedImageModeling))
    model = build(ViTModel)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        pruneattn.patch(model, layers=(3, 6, 9))  # block 6 does not exist in a 6-layer model
    pruneattn.patch(model)  # default layers: 1/4, 1/2, 3/4 of the depth
    assert sorted(m._pruneattn.layer for m in model.modules() if hasattr(m, "_pruneattn")) == [2, 3, 5]
    pruneattn.unpatch(model)
    assert all(type(layer) is ViTLayer for layer in model.layers)
