"""``init_weights()`` and ``from_pretrained``'s initialization of missing weights give a patched Hugging Face
model the same weights as the unpatched one under the same seed.

transformers initializes a model's submodules through its own ``_init_weights`` unless it takes the model
for custom code (a class defined outside ``transformers.``); a swapped class must not look like one.
Both paths are run the way transformers runs them: a model built on the meta device, moved to the CPU
and initialized; and ``from_pretrained`` with no weights at all, the seed set before each submodule
model's initialization (as transformers' own tests do), the model patched where it is built.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pruneattn

transformers = pytest.importorskip("transformers")
import transformers as T  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, pad_token_id=0)


def _qwen(kind: str):
    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    tokens = dict(image_token_id=90, video_token_id=93, vision_start_token_id=91, vision_end_token_id=92)
    if kind == "2.5":
        vision = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=64, out_hidden_size=32, patch_size=4,
                      window_size=16, fullatt_block_indexes=[1], spatial_merge_size=2)
        return T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2)
    return T.Qwen2VLForConditionalGeneration, T.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)


MODELS = {
    "vit": lambda: (T.ViTForImageClassification, T.ViTConfig(**VISION, image_size=16, patch_size=4)),
    "deit": lambda: (T.DeiTForImageClassificationWithTeacher, T.DeiTConfig(**VISION, image_size=16, patch_size=4)),
    "clip": lambda: (T.CLIPVisionModelWithProjection, T.CLIPVisionConfig(**VISION, image_size=16, patch_size=4)),
    "siglip": lambda: (T.SiglipVisionModel, T.SiglipVisionConfig(**VISION, image_size=16, patch_size=4)),
    "dinov2": lambda: (T.Dinov2ForImageClassification, T.Dinov2Config(**VISION, image_size=16, patch_size=4)),
    "dinov2_registers": lambda: (T.Dinov2WithRegistersModel,
                                 T.Dinov2WithRegistersConfig(**VISION, image_size=16, patch_size=4)),
    "dinov3": lambda: (T.DINOv3ViTModel, T.DINOv3ViTConfig(**VISION, image_size=16, patch_size=4)),
    "siglip2": lambda: (T.Siglip2VisionModel, T.Siglip2VisionConfig(**VISION, patch_size=4, num_patches=16)),
    "llava": lambda: (T.LlavaForConditionalGeneration, T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**VISION, image_size=16, patch_size=4), text_config=T.LlamaConfig(**TEXT),
        image_token_id=99)),
    "paligemma": lambda: (T.PaliGemmaForConditionalGeneration, T.PaliGemmaConfig(
        vision_config=T.SiglipVisionConfig(**VISION, image_size=16, patch_size=4, projection_dim=32),
        text_config=T.GemmaConfig(**TEXT, head_dim=8), image_token_id=99, projection_dim=32)),
    "qwen2-vl": lambda: _qwen("2"),
    "qwen2.5-vl": lambda: _qwen("2.5"),
}
PATCH = {"qwen2-vl": dict(tokens=1), "qwen2.5-vl": dict(tokens=1)}  # the others: the default keep rate


def _differing(a: dict, b: dict) -> list[str]:
    assert sorted(a) == sorted(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_weights_of_a_meta_built_model(name):
    """Built on the meta device, patched, moved to the CPU, ``init_weights()`` under a seed: the unpatched
    model's weights. The model's class does not look like custom code to transformers."""
    cls, config = MODELS[name]()
    states = []
    for patched in (False, True):
        with torch.device("meta"):
            model = cls(copy.deepcopy(config))
        if patched:
            pruneattn.patch(model, **PATCH.get(name, {}))
            assert not type(model).is_custom_code()
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        states.append(model.state_dict())
    assert _differing(*states) == []
    assert len(states[0]) > 10


@pytest.mark.parametrize("name", ["llava", "paligemma", "qwen2.5-vl", "vit", "siglip2"])
def test_from_pretrained_initializes_missing_weights_as_unpatched(name, monkeypatch):
    """``from_pretrained`` with every weight missing, the model patched as soon as it is built (in
    ``post_init``), each submodule model's initialization seeded: the weights of the unpatched model
    built by ``__init__`` under the same seeding."""
    cls, config = MODELS[name]()
    initialize = PreTrainedModel._initialize_weights

    def seeded(self, *args, **kwargs):
        torch.manual_seed(42)
        return initialize(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    want = cls(copy.deepcopy(config)).state_dict()
    post_init = PreTrainedModel.post_init

    def patch_when_built(self):
        post_init(self)
        if type(self) is cls:
            pruneattn.patch(self, **PATCH.get(name, {}))

    monkeypatch.setattr(PreTrainedModel, "post_init", patch_when_built)
    model = cls.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    assert any(hasattr(m, "_pruneattn") for m in model.modules())
    assert _differing(want, model.state_dict()) == []
