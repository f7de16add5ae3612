"""The model families pruneattn patches, and those it refuses with the reason: the one list of them.

Each :class:`Family` says which model classes it takes, where their blocks are, how many prefix tokens
come before the patches, whether there is a class token and rotary embedding, how q / k / v are taken
and where selection sits in each block class (:mod:`pruneattn.patch.blocks`). ``pruneattn.patch``, its
error messages, the tables of supported models in docs/models.md (checked by a test) and the benchmarks' model
table all read this list. The families are plain data (class names, attribute names), so the library
of a model (timm, transformers) is imported only when a model of it is patched; the library's
:class:`Adapter` turns an entry into blocks and forwards.

Adding a Hugging Face encoder whose layers are pre-norm with ``q_proj`` / ``k_proj`` / ``v_proj`` is one
entry here plus a test.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from pruneattn.patch.blocks import AttentionReader, BlockShape, Parallel, Residual, Sequential
from pruneattn.patch.state import Plan


@dataclass(frozen=True)
class HFAttention:
    """Attribute names of a Hugging Face attention module (separate q / k / v projections)."""

    out: str  # the output projection
    scale: str  # the logit scale
    dropout: str  # the attention-dropout probability
    qkv: str | None = None  # one fused q / k / v projection (BLIP-2); None: q_proj / k_proj / v_proj
    qk_norm: tuple[str, str] | None = None  # norms of q and k over all heads, before the split (InternVL)
    out_dropout: str | None = None  # a dropout after the output projection
    rotary_float32: bool = False  # the model rotates q and k in float32 whatever their dtype (Qwen2.5-VL)


@dataclass(frozen=True)
class Family:
    """A model family pruneattn patches."""

    label: str  # its name in the tables of docs/models.md
    library: str  # top-level package of its classes
    models: tuple[str, ...]  # model classes it takes (their subclasses too)
    covers: str  # for docs/models.md: variants and checkpoints
    blocks: tuple[BlockShape, ...]  # its block classes and where selection sits in each
    layers: str  # attribute path from the encoder to its list of blocks
    encoder: tuple[str, ...] = ()  # Hugging Face: the vision encoder classes found inside those models
    prefix: int = 1  # tokens before the patches (class, distillation)...
    prefix_from: str | None = None  # ...plus this attribute path of the encoder (timm, registers)
    class_token: bool | None = True  # None: the model says (timm: ``cls_token`` is set)
    rotary: bool = False  # rotary tables follow the kept patches (timm ``Eva``, Hugging Face DINOv3)
    attention: HFAttention | None = None  # Hugging Face attention names; None: timm's modules
    masking: str | None = None  # attribute path of an embedding that drops patches at random (ViT-MAE)
    padding: str | None = None  # the encoder's forward argument (second) holding a padding mask of its patches
    pool_mask: str | None = None  # attribute path of a pooling head that takes (tokens, padding mask)
    packed: str | None = None  # attribute path of the module that runs the blocks on images packed in one
    # sequence (Pixtral): the pruning blocks run on them padded per image instead
    windows: str | None = None  # attribute path of the encoder's list of full-attention blocks: the others
    # attend within windows, and only these can score (Qwen2.5-VL's tower, :mod:`pruneattn.patch.windowed`)
    merge_from: str | None = None  # attribute path of the encoder's merge size m: its connector merges m x m
    # patches into one token, so they are scored and kept as one unit (:mod:`pruneattn.patch.windowed`)
    deepstack: str | None = None  # attribute path of the encoder's extra mergers, run on the output of earlier
    # blocks, whose features it returns beside its output (Qwen3-VL's DeepStack): they follow the kept units too
    default_blocks: tuple[int, ...] | None = None  # the default pruning blocks (negative: from the end, -1 the
    # last); None: EViT's (:func:`pruneattn.patch.default_layers`)


def attribute(obj: object, path: str) -> object:
    """``obj.a.b`` for the path ``"a.b"``."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def blocks_of(family: Family, encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks, in order."""
    return list(attribute(encoder, family.layers))


def unit_of(family: Family, encoder: nn.Module) -> int:
    """Patches per selection unit: 1, or the tokens the encoder merges into one (kept or dropped whole)."""
    return 1 if family.merge_from is None else int(attribute(encoder, family.merge_from)) ** 2


def full_attention_blocks(family: Family, encoder: nn.Module) -> tuple[int, ...] | None:
    """The blocks that attend over each whole image (the only ones that can score), or None: all do."""
    return None if family.windows is None else tuple(int(i) for i in attribute(encoder, family.windows))


def num_prefix(family: Family, encoder: nn.Module) -> int:
    """Tokens before the patches: class, distillation, register tokens."""
    extra = 0 if family.prefix_from is None else int(attribute(encoder, family.prefix_from))
    return family.prefix + extra


class Adapter(Protocol):
    """What a library's adapter does with a :class:`Family` entry and a model of it."""

    def encoder(self, family: Family, model: nn.Module) -> nn.Module:
        """The module that holds the blocks and whose forward is one call of the patched model."""

    def has_class_token(self, family: Family, model: nn.Module) -> bool:
        """Whether the model has a class token (where ``family.class_token`` leaves it to the model)."""

    def check_block(self, family: Family, block: nn.Module, shape: BlockShape, layer: int) -> None:
        """Raise if this block cannot be pruned (an attention the kernels cannot reproduce, dropout)."""

    def reader(self, family: Family) -> AttentionReader: ...

    def pruned_block(self, shape: BlockShape, family: Family) -> type:
        """The mixin swapped into blocks of this shape of ``family``."""

    def attach(self, family: Family, encoder: nn.Module, plan: Plan) -> None:
        """Make each forward call of ``encoder`` open a state of its own (:mod:`pruneattn.patch.state`);
        whatever is swapped or hooked here carries ``_pruneattn_plan`` (and ``_pruneattn_hooks``), which
        ``unpatch`` removes."""


_TIMM_PRE = Residual("attn", norm="norm1", after=("ls1", "drop_path1"))
_TIMM_MLP = Residual("mlp", norm="norm2", after=("ls2", "drop_path2"))
_EVA_PRE = Residual("attn", norm="norm1", after=("gamma_1", "drop_path1"))
_EVA_MLP = Residual("mlp", norm="norm2", after=("gamma_2", "drop_path2"))
_POST = Residual("attn", after=("norm1", "drop_path1"))
_POST_MLP = Residual("mlp", after=("norm2", "drop_path2"))
_HF_VIT = HFAttention(out="o_proj", scale="scaling", dropout="attention_dropout")
_HF_CLIP = HFAttention(out="out_proj", scale="scale", dropout="dropout")
_VIT_LAYER = (Residual("attention", norm="layernorm_before", after=("dropout",)),
              Residual("mlp", norm="layernorm_after", after=("dropout",)))
_CLIP_LAYER = (Residual("self_attn", norm="layer_norm1"), Residual("mlp", norm="layer_norm2"))
_QWEN_BLOCK = (Residual("attn", norm="norm1"), Residual("mlp", norm="norm2"))
_QWEN_ATTENTION = HFAttention(out="proj", scale="scaling", dropout="attention_dropout", qkv="qkv", rotary_float32=True)
_MERGED_UNITS = ("images of any size packed in one sequence; pruned per image, whole 2 x 2 merged units, k per "
                 "image, by default in the last block (the one its merger reads), earlier blocks with `layers=`; "
                 "`pooler_output` holds the kept merged units and `kept_units` their places; no class token: "
                 "query='mean'; mode='drop'")

FAMILIES: tuple[Family, ...] = (
    Family(
        "timm VisionTransformer", "timm", ("VisionTransformer",),
        "vit_*, deit_* (distilled too), vit_*_18x2_* (parallel blocks), registers, global average pooling, "
        "post-norm blocks, q/k norm, layer scale",
        (
            Sequential("Block", _TIMM_PRE, _TIMM_MLP),
            Sequential("ResPostBlock", _POST, _POST_MLP),
            Parallel("ParallelScalingBlock"),
            Parallel("ParallelThingsBlock"),
        ),
        layers="blocks", prefix=0, prefix_from="num_prefix_tokens", class_token=None,
    ),
    Family(
        "timm Eva", "timm", ("Eva",),
        "eva02_*, vit_*_rope* (rope_mixed too), vit_*_dinov3: the rotary table follows the kept patches; SwiGLU, "
        "layer scale, q/k norm, registers",
        (Sequential("EvaBlock", _EVA_PRE, _EVA_MLP), Sequential("EvaBlockPostNorm", _POST, _POST_MLP)),
        layers="blocks", prefix=0, prefix_from="num_prefix_tokens", class_token=None, rotary=True,
    ),
    Family(
        "timm NaFlexVit", "timm", ("NaFlexVit",),
        "naflexvit_* (images of different sizes in one batch: `patch_valid`, k per image; fixed-size images too; "
        "axial and mixed rotary embedding follow the kept patches; average, max or attention pooling of the kept "
        "tokens)",
        (Sequential("Block", _TIMM_PRE, _TIMM_MLP), Sequential("EvaBlock", _EVA_PRE, _EVA_MLP)),
        layers="blocks", prefix=0, prefix_from="num_prefix_tokens", class_token=None, rotary=True,
        padding="patch_valid",
    ),
    Family(
        "Hugging Face ViT", "transformers", ("ViTModel", "ViTForImageClassification"),
        "google/vit-*",
        (Sequential("ViTLayer", Residual("attention", norm="layernorm_before", after=("dropout",)),
                    Residual("mlp", norm="layernorm_after", after=("dropout",))),),
        layers="layers", encoder=("ViTModel",), attention=_HF_VIT,
    ),
    Family(
        "Hugging Face DeiT", "transformers",
        ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
        "facebook/deit-* (class and distillation tokens)",
        (Sequential("DeiTLayer", Residual("attention", norm="layernorm_before", after=("dropout",)),
                    Residual("mlp", norm="layernorm_after", after=("dropout",))),),
        layers="layers", encoder=("DeiTModel",), prefix=2, attention=_HF_VIT,
    ),
    Family(
        "Hugging Face CLIP vision", "transformers", ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"),
        "openai/clip-vit-* (the vision side; pre_layrnorm / post_layernorm untouched)",
        (Sequential("CLIPEncoderLayer", Residual("self_attn", norm="layer_norm1"),
                    Residual("mlp", norm="layer_norm2")),),
        layers="encoder.layers", encoder=("CLIPVisionModel",), attention=_HF_CLIP,
    ),
    Family(
        "Hugging Face SigLIP vision", "transformers", ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification"),
        "google/siglip-* (no class token: query='mean'; the attention-pooling head pools the kept tokens)",
        (Sequential("SiglipEncoderLayer", Residual("self_attn", norm="layer_norm1"),
                    Residual("mlp", norm="layer_norm2")),),
        layers="encoder.layers", encoder=("SiglipVisionModel",), prefix=0, class_token=False,
        attention=_HF_CLIP,
    ),
    Family(
        "Hugging Face DINOv2", "transformers", ("Dinov2Model", "Dinov2ForImageClassification"),
        "facebook/dinov2-* (layer scale)",
        (Sequential("Dinov2Layer", Residual("attention", norm="norm1", after=("layer_scale1", "drop_path")),
                    Residual("mlp", norm="norm2", after=("layer_scale2", "drop_path"))),),
        layers="encoder.layer", encoder=("Dinov2Model",), attention=_HF_VIT,
    ),
    Family(
        "Hugging Face DINOv2 with registers", "transformers",
        ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
        "facebook/dinov2-with-registers-* (register tokens are prefix tokens)",
        (Sequential("Dinov2WithRegistersLayer",
                    Residual("attention", norm="norm1", after=("layer_scale1", "drop_path")),
                    Residual("mlp", norm="norm2", after=("layer_scale2", "drop_path"))),),
        layers="encoder.layer", encoder=("Dinov2WithRegistersModel",),
        prefix_from="config.num_register_tokens", attention=_HF_VIT,
    ),
    Family(
        "open_clip VisionTransformer", "open_clip", ("VisionTransformer", "CLIP", "CustomTextCLIP", "CoCa"),
        "open_clip.create_model('ViT-*') towers (`model.visual`; nn.MultiheadAttention read in place; class-token, "
        "average or attentional pooling of the kept tokens; patch dropout)",
        (Sequential("ResidualAttentionBlock", Residual("attn", norm="ln_1", after=("ls_1",)),
                    Residual("mlp", norm="ln_2", after=("ls_2",))),),
        layers="transformer.resblocks", encoder=("VisionTransformer",),
    ),
    Family(
        "Hugging Face DINOv3 ViT", "transformers", ("DINOv3ViTModel",),
        "facebook/dinov3-vit* (registers, layer scale; the rotary tables follow the kept patches)",
        (Sequential("DINOv3ViTLayer", Residual("attention", norm="norm1", after=("layer_scale1", "drop_path")),
                    Residual("mlp", norm="norm2", after=("layer_scale2", "drop_path"))),),
        layers="model.layer", encoder=("DINOv3ViTModel",), prefix_from="config.num_register_tokens",
        rotary=True, attention=HFAttention(out="o_proj", scale="scaling", dropout="dropout"),
    ),
    Family(
        "Hugging Face ViT-MSN", "transformers", ("ViTMSNModel", "ViTMSNForImageClassification"),
        "facebook/vit-msn-*",
        (Sequential("ViTMSNLayer", *_VIT_LAYER),), layers="layers", encoder=("ViTMSNModel",), attention=_HF_VIT,
    ),
    Family(
        "Hugging Face I-JEPA", "transformers", ("IJepaModel", "IJepaForImageClassification"),
        "facebook/ijepa_* (no class token: query='mean')",
        (Sequential("IJepaLayer", *_VIT_LAYER),), layers="layers", encoder=("IJepaModel",), prefix=0,
        class_token=False, attention=_HF_VIT,
    ),
    Family(
        "Hugging Face ViT-MAE", "transformers", ("ViTMAEModel",),
        "facebook/vit-mae-* encoder (with its random masking on, kept indices index the full grid)",
        (Sequential("ViTMAELayer", *_VIT_LAYER),), layers="layers", encoder=("ViTMAEModel",), attention=_HF_VIT,
        masking="embeddings",
    ),
    Family(
        "Hugging Face Chinese-CLIP vision", "transformers", ("ChineseCLIPVisionModel", "ChineseCLIPModel"),
        "OFA-Sys/chinese-clip-vit-* (the vision side)",
        (Sequential("ChineseCLIPVisionLayer", *_CLIP_LAYER),), layers="encoder.layers",
        encoder=("ChineseCLIPVisionModel",), attention=_HF_CLIP,
    ),
    Family(
        "Hugging Face OWLv2 vision", "transformers", ("Owlv2VisionModel",),
        "google/owlv2-* vision model (the detector itself is refused: it needs every patch)",
        (Sequential("Owlv2EncoderLayer", *_CLIP_LAYER),), layers="encoder.layers",
        encoder=("Owlv2VisionTransformer",), attention=_HF_CLIP,
    ),
    Family(
        "Hugging Face GIT vision", "transformers", ("GitVisionModel",),
        "microsoft/git-* vision encoder",
        (Sequential("GitVisionEncoderLayer", *_CLIP_LAYER),), layers="encoder.layers",
        encoder=("GitVisionTransformer",), attention=_HF_CLIP,
    ),
    Family(
        "Hugging Face BLIP-2 vision", "transformers", ("Blip2VisionModel",),
        "Salesforce/blip2-* vision encoder (one fused qkv projection)",
        (Sequential("Blip2EncoderLayer", *_CLIP_LAYER),), layers="encoder.layers", encoder=("Blip2VisionModel",),
        attention=HFAttention(out="projection", scale="scale", dropout="attention_dropout", qkv="qkv"),
    ),
    Family(
        "Hugging Face AIMv2 vision", "transformers", ("Aimv2VisionModel",),
        "apple/aimv2-* (no class token: query='mean'; RMSNorm)",
        (Sequential("Aimv2EncoderLayer", Residual("attention", norm="rms_norm1"), Residual("ffn", norm="rms_norm2")),),
        layers="encoder.layers", encoder=("Aimv2VisionModel",), prefix=0, class_token=False, attention=_HF_CLIP,
    ),
    Family(
        "Hugging Face InternVL vision", "transformers", ("InternVLVisionModel",),
        "OpenGVLab/InternVL3-* vision encoder (q/k norm, layer scale)",
        (Sequential("InternVLVisionLayer", Residual("attention", norm="layernorm_before", after=("lambda_1",)),
                    Residual("mlp", norm="layernorm_after", after=("dropout", "lambda_2"))),),
        layers="encoder.layer", encoder=("InternVLVisionModel",),
        attention=HFAttention(out="projection_layer", scale="scale", dropout="attention_dropout",
                              qk_norm=("q_norm", "k_norm"), out_dropout="projection_dropout"),
    ),
    Family(
        "Hugging Face SigLIP2 vision (NaFlex)", "transformers", ("Siglip2VisionModel", "Siglip2Model"),
        "google/siglip2-* (images of different sizes in one batch: `pixel_attention_mask`, k per image; no class "
        "token: query='mean'; the attention-pooling head pools the kept tokens)",
        (Sequential("Siglip2EncoderLayer", *_CLIP_LAYER),), layers="encoder.layers", encoder=("Siglip2VisionModel",),
        prefix=0, class_token=False, attention=_HF_CLIP, padding="pixel_attention_mask", pool_mask="head",
    ),
    Family(
        "Hugging Face Pixtral vision", "transformers", ("PixtralVisionModel",),
        "mistral-community/pixtral-12b vision encoder (images of any size packed in one sequence: scored and "
        "pruned per image, k per image; 2-D rotary tables follow the kept patches; no class token: query='mean'; "
        "mode='drop')",
        (Sequential("PixtralAttentionLayer", Residual("attention", norm="attention_norm"),
                    Residual("feed_forward", norm="ffn_norm")),),
        layers="transformer.layers", encoder=("PixtralVisionModel",), prefix=0, class_token=False,
        attention=HFAttention(out="o_proj", scale="scaling", dropout="dropout"), packed="transformer",
    ),
    Family(
        "Hugging Face Idefics3 / SmolVLM vision", "transformers",
        ("Idefics3VisionTransformer", "SmolVLMVisionTransformer"),
        "the vision towers of HuggingFaceM4/Idefics3-*, HuggingFaceTB/SmolVLM* (`patch_attention_mask`, k per "
        "image; no class token: query='mean')",
        (Sequential("Idefics3EncoderLayer", *_CLIP_LAYER), Sequential("SmolVLMEncoderLayer", *_CLIP_LAYER)),
        layers="encoder.layers", encoder=("Idefics3VisionTransformer", "SmolVLMVisionTransformer"), prefix=0,
        class_token=False, attention=_HF_CLIP, padding="patch_attention_mask",
    ),
    Family(
        "Hugging Face Qwen2.5-VL vision", "transformers", ("Qwen2_5_VisionTransformerPretrainedModel",),
        "the vision tower of Qwen/Qwen2.5-VL-* (images of any size packed in one sequence; pruned per image in "
        "its full-attention blocks only, whole 2 x 2 merged units, k per image; the window attention after them "
        "runs over the kept tokens; `pooler_output` holds the kept merged units; no class token: query='mean'; "
        "mode='drop')",
        (Sequential("Qwen2_5_VLVisionBlock", *_QWEN_BLOCK),),
        layers="blocks", encoder=("Qwen2_5_VisionTransformerPretrainedModel",), prefix=0, class_token=False,
        attention=_QWEN_ATTENTION,
        windows="fullatt_block_indexes", merge_from="spatial_merge_size",
    ),
    Family(
        "Hugging Face Qwen2-VL vision", "transformers", ("Qwen2VisionTransformerPretrainedModel",),
        "the vision tower of Qwen/Qwen2-VL-* (images of any size packed in one sequence; pruned per image, whole "
        "2 x 2 merged units, k per image; `pooler_output` holds the kept merged units; no class token: "
        "query='mean'; mode='drop')",
        (Sequential("Qwen2VLVisionBlock", *_QWEN_BLOCK),),
        layers="blocks", encoder=("Qwen2VisionTransformerPretrainedModel",), prefix=0, class_token=False,
        attention=_QWEN_ATTENTION,
        merge_from="spatial_merge_size",
    ),
    Family(
        "Hugging Face Qwen3-VL vision", "transformers", ("Qwen3VLVisionModel", "Qwen3VLMoeVisionModel"),
        f"the vision towers of Qwen/Qwen3-VL-* and Qwen3-VL-MoE ({_MERGED_UNITS}; the DeepStack features hold the "
        "same kept units, in the same order, wherever their blocks sit)",
        (Sequential("Qwen3VLVisionBlock", *_QWEN_BLOCK), Sequential("Qwen3VLMoeVisionBlock", *_QWEN_BLOCK)),
        layers="blocks", encoder=("Qwen3VLVisionModel", "Qwen3VLMoeVisionModel"), prefix=0, class_token=False,
        attention=_QWEN_ATTENTION, merge_from="spatial_merge_size", deepstack="deepstack_merger_list",
        default_blocks=(-1,),
    ),
    Family(
        "Hugging Face Qwen3.5 vision", "transformers", ("Qwen3_5VisionModel", "Qwen3_5MoeVisionModel"),
        f"the vision towers of Qwen/Qwen3.5-* and Qwen3.5-MoE ({_MERGED_UNITS})",
        (Sequential("Qwen3_5VisionBlock", *_QWEN_BLOCK), Sequential("Qwen3_5MoeVisionBlock", *_QWEN_BLOCK)),
        layers="blocks", encoder=("Qwen3_5VisionModel", "Qwen3_5MoeVisionModel"), prefix=0, class_token=False,
        attention=_QWEN_ATTENTION, merge_from="spatial_merge_size", default_blocks=(-1,),
    ),
    Family(
        "Hugging Face GLM-4.1V / 4.5V / 4.6V vision", "transformers", ("Glm4vVisionModel", "Glm4vMoeVisionModel"),
        f"the vision towers of zai-org/GLM-4.1V-*, GLM-4.5V, GLM-4.6V ({_MERGED_UNITS}; its 2 x 2 strided "
        "downsample reads whole kept units, and `last_hidden_state` holds them downsampled)",
        (Sequential("Glm4vVisionBlock", *_QWEN_BLOCK), Sequential("Glm4vMoeVisionBlock", *_QWEN_BLOCK)),
        layers="blocks", encoder=("Glm4vVisionModel", "Glm4vMoeVisionModel"), prefix=0, class_token=False,
        attention=_QWEN_ATTENTION, merge_from="spatial_merge_size", default_blocks=(-1,),
    ),
)


_MERGED_VLM = ("images of any size, several per prompt: whole 2 x 2 merged units pruned per image in the tower's last "
               "block, k = ceil(rate * units) per image; kept tokens keep their M-RoPE (t, h, w) ids; images only, no "
               "videos")


@dataclass(frozen=True)
class VisionLanguage:
    """A vision-language family: a language model reads the output tokens of a vision tower. pruneattn
    prunes them in the tower and plans or shortens the prompt to match (:mod:`pruneattn.patch.vlm`)."""

    label: str
    library: str
    models: tuple[str, ...]  # classes ``patch`` takes (their subclasses too): the generation model, the base
    base: str  # the class that puts image features in place of the placeholders (in ``models``)
    towers: tuple[str, ...]  # labels of the tower families it can prune (entries of FAMILIES)
    covers: str
    tower: str = "vision_tower"  # the base model's attribute holding its vision tower
    feature_layer: str | None = None  # config attribute: the tower hidden state(s) it reads; None: the last
    select_strategy: str | None = None  # config attribute: "default" drops the class token, "full" keeps it
    grid: str | None = None  # the call's argument with each image's (t, h, w) patch grid (images of any size);
    # None: fixed-size images, their patch count from the tower's config
    positions: str = "1d"  # "1d": positions count the prompt's tokens; "mrope": (t, h, w) ids from the
    # model's ``get_rope_index``, kept tokens at their original ids
    connector: str | None = None  # its connector joins m x m windows of patches into one token, kept whole
    # (:mod:`pruneattn.patch.vlm.connectors` names them); None: one token per patch, or the tower merges
    sizes: str | None = None  # the call's argument with each image's (height, width) in pixels (images of any
    # size padded into one tensor)
    stacked: bool = False  # pixel_values are (prompts, images, channels, height, width), all-zero images padding
    layout: str = "tiles"  # "tiles": each run of placeholders holds whole images (or tiles), each keeping k;
    # the tokens around the runs stay. "rows": an image's placeholders come in rows of its unit grid, each row
    # followed by one layout token; the kept ones are laid out as the processor lays out that many
    placeholder: str = "image_token"  # the processor's attribute (path) holding the placeholder the model reads
    tiles: bool = False  # its processor splits an image into tiles of the tower's size, each taking its own run


_TILES = ("each tile (the thumbnail or whole-image view too) keeps k of its units; the tags around its "
          "placeholders are the processor's; images only, no videos")
VISION_LANGUAGE: tuple[VisionLanguage, ...] = (
    VisionLanguage(
        "Hugging Face LLaVA", "transformers", ("LlavaForConditionalGeneration", "LlavaModel"), "LlavaModel",
        ("Hugging Face CLIP vision", "Hugging Face SigLIP vision"),
        "llava-hf/llava-1.5-*, llava-interleave (any `vision_feature_layer`, int or list; both "
        "`vision_feature_select_strategy` values)",
        feature_layer="vision_feature_layer", select_strategy="vision_feature_select_strategy",
    ),
    VisionLanguage(
        "Hugging Face PaliGemma", "transformers", ("PaliGemmaForConditionalGeneration", "PaliGemmaModel"),
        "PaliGemmaModel", ("Hugging Face SigLIP vision",),
        "google/paligemma-*, google/paligemma2-* (`token_type_ids` shortened with the prompt)",
    ),
    VisionLanguage(
        "Hugging Face Qwen2.5-VL", "transformers", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
        "Qwen2_5_VLModel", ("Hugging Face Qwen2.5-VL vision",),
        f"Qwen/Qwen2.5-VL-* ({_MERGED_VLM})",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face Qwen2-VL", "transformers", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
        "Qwen2VLModel", ("Hugging Face Qwen2-VL vision",),
        "Qwen/Qwen2-VL-* (as Qwen2.5-VL: whole 2 x 2 merged units per image in the tower's last block; M-RoPE ids "
        "kept; images only, no videos)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face InternVL", "transformers", ("InternVLForConditionalGeneration", "InternVLModel"),
        "InternVLModel", ("Hugging Face InternVL vision",),
        "OpenGVLab/InternVL3-*-hf, InternVL3.5-*-HF (whole 2 x 2 pixel-shuffle groups pruned per 448 px tile in the "
        f"feature layer, k per tile; {_TILES})",
        feature_layer="vision_feature_layer", select_strategy="vision_feature_select_strategy", connector="internvl",
        tiles=True,
    ),
    VisionLanguage(
        "Hugging Face Gemma 3", "transformers", ("Gemma3ForConditionalGeneration", "Gemma3Model"), "Gemma3Model",
        ("Hugging Face SigLIP vision",),
        "google/gemma-3-4b/12b/27b-* (whole 4 x 4 average-pool windows pruned per 896 px image in the tower's last "
        "block, k per image (each pan-and-scan crop is one image); the bidirectional attention among an image's "
        "tokens spans its kept tokens)",
        connector="gemma3", placeholder="tokenizer.image_token",
    ),
    VisionLanguage(
        "Hugging Face Mistral 3", "transformers", ("Mistral3ForConditionalGeneration", "Mistral3Model"),
        "Mistral3Model", ("Hugging Face Pixtral vision",),
        "mistralai/Mistral-Small-3.1-*, 3.2 (images of any size: whole 2 x 2 merged units pruned per image in the "
        "tower's last block, k = ceil(rate * units) per image; the kept tokens laid out in rows of the image's "
        "width, `[IMG_BREAK]` between rows, `[IMG_END]` last, as the processor lays out that many)",
        feature_layer="vision_feature_layer", connector="mistral3", sizes="image_sizes", layout="rows",
    ),
    VisionLanguage(
        "Hugging Face SmolVLM", "transformers", ("SmolVLMForConditionalGeneration", "SmolVLMModel"), "SmolVLMModel",
        ("Hugging Face Idefics3 / SmolVLM vision",),
        "HuggingFaceTB/SmolVLM-*, SmolVLM2-* (whole pixel-shuffle groups pruned per tile in the tower's last block, "
        f"k per tile; {_TILES})",
        tower="vision_model", connector="pixel_shuffle", stacked=True, tiles=True,
    ),
    VisionLanguage(
        "Hugging Face Idefics3", "transformers", ("Idefics3ForConditionalGeneration", "Idefics3Model"),
        "Idefics3Model", ("Hugging Face Idefics3 / SmolVLM vision",),
        f"HuggingFaceM4/Idefics3-8B-Llama3 (as SmolVLM: whole pixel-shuffle groups per tile, k per tile; {_TILES})",
        tower="vision_model", connector="pixel_shuffle", stacked=True, tiles=True,
    ),
    VisionLanguage(
        "Hugging Face Qwen3-VL", "transformers", ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"), "Qwen3VLModel",
        ("Hugging Face Qwen3-VL vision",),
        f"Qwen/Qwen3-VL-* ({_MERGED_VLM}; the DeepStack features that its first language-model layers add at the "
        "image positions are taken at the same kept units)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face Qwen3-VL-MoE", "transformers", ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel"),
        "Qwen3VLMoeModel", ("Hugging Face Qwen3-VL vision",),
        "Qwen/Qwen3-VL-*-A*B (as Qwen3-VL, DeepStack included; mixture-of-experts language model)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face Qwen3.5", "transformers", ("Qwen3_5ForConditionalGeneration", "Qwen3_5Model"), "Qwen3_5Model",
        ("Hugging Face Qwen3.5 vision",),
        f"Qwen/Qwen3.5-* ({_MERGED_VLM}; hybrid Gated-DeltaNet / attention language model, its cache holds the "
        "kept tokens)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face Qwen3.5-MoE", "transformers", ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel"),
        "Qwen3_5MoeModel", ("Hugging Face Qwen3.5 vision",),
        "Qwen/Qwen3.5-*-A*B (as Qwen3.5; mixture-of-experts language model)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face GLM-4.1V", "transformers", ("Glm4vForConditionalGeneration", "Glm4vModel"), "Glm4vModel",
        ("Hugging Face GLM-4.1V / 4.5V / 4.6V vision",),
        f"zai-org/GLM-4.1V-* ({_MERGED_VLM}; the image begin / end tokens stay)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face GLM-4.5V", "transformers", ("Glm4vMoeForConditionalGeneration", "Glm4vMoeModel"), "Glm4vMoeModel",
        ("Hugging Face GLM-4.1V / 4.5V / 4.6V vision",),
        "zai-org/GLM-4.5V (as GLM-4.1V; mixture-of-experts language model)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
    VisionLanguage(
        "Hugging Face GLM-4.6V", "transformers", ("Glm46VForConditionalGeneration", "Glm46VModel"), "Glm46VModel",
        ("Hugging Face GLM-4.1V / 4.5V / 4.6V vision",),
        "zai-org/GLM-4.6V-* (as GLM-4.1V)",
        tower="visual", grid="image_grid_thw", positions="mrope",
    ),
)


_REL_POS = "its attention adds a relative position bias per token pair, which the fused kernels do not take"
_ANYRES = ("after its vision tower, the tiles of an image are stitched into one grid and cropped to the image "
           "(unpadding), with a newline token after each row of that grid: how many kept tokens survive the crop "
           "would depend on which patches were kept, so the prompt could not be written from the image's size; "
           "patch its vision tower (`model.model.vision_tower`) for pruned features")
_GEMMA4 = ("its vision tower (Gemma4VisionModel) normalizes q, k and v per head and rotates them by tables of pixel "
           "positions, which pruneattn's attention readers do not reproduce, and it pools 3 x 3 windows of pixel "
           "positions to a token budget over padded images; pruneattn prunes neither that tower nor the whole model")
# Model classes that look like ViTs but whose attention pruneattn cannot reproduce: (library, class) -> why.
REFUSED: dict[tuple[str, str], str] = {
    ("timm", "Beit"): _REL_POS,
    ("timm", "VisionTransformerRelPos"): _REL_POS,
    ("timm", "Cait"): "its class-attention blocks attend from the class token only, so patch scores are not "
    "defined the same way",
    ("timm", "Xcit"): "its cross-covariance attention attends over channels, not tokens",
    ("timm", "VisionTransformerSAM"): "its windowed attention with relative position bias is not global attention",
    ("transformers", "Siglip2ForImageClassification"): "its classifier averages the encoder output with the "
    "input's padding mask outside the encoder, so it needs every patch; patch its Siglip2VisionModel "
    "(model.vision_model) for features",
    ("transformers", "BeitModel"): _REL_POS,
    ("transformers", "Data2VecVisionModel"): _REL_POS,
    ("transformers", "ViTMAEForPreTraining"): "its decoder puts every patch of the grid back in place and "
    "reconstructs the masked ones, so it needs all patch tokens; patch its encoder (model.vit) instead",
    ("transformers", "Owlv2ForObjectDetection"): "its heads predict one box per patch of the full grid; patch "
    "its Owlv2VisionModel alone for features",
    ("transformers", "LlavaNextForConditionalGeneration"): _ANYRES,
    ("transformers", "LlavaNextModel"): _ANYRES,
    ("transformers", "LlavaOnevisionForConditionalGeneration"): _ANYRES,
    ("transformers", "LlavaOnevisionModel"): _ANYRES,
    ("transformers", "Gemma4ForConditionalGeneration"): _GEMMA4,
    ("transformers", "Gemma4Model"): _GEMMA4,
    ("transformers", "Blip2ForConditionalGeneration"): "its language model reads a fixed number of Q-Former "
    "query tokens, not the image patches, so pruning patches would not shorten what it reads",
    ("transformers", "MllamaForConditionalGeneration"): "its language model reads the image through "
    "cross-attention layers, not as tokens of the prompt",
}

_ADAPTERS = {"timm": "pruneattn.patch.timm", "transformers": "pruneattn.patch.hf",
             "open_clip": "pruneattn.patch.openclip"}


def _mro(model: object) -> list[tuple[str, str]]:
    return [(cls.__module__.split(".")[0], cls.__name__) for cls in type(model).__mro__]


def family_of(model: object) -> Family | None:
    """The family that takes ``model`` (by its class or a base class), or None."""
    for lib, name in _mro(model):
        for fam in FAMILIES:
            if fam.library == lib and name in fam.models:
                return fam
    return None


def vision_language_of(model: object) -> VisionLanguage | None:
    """The vision-language family that takes ``model`` (by its class or a base class), or None."""
    for lib, name in _mro(model):
        for fam in VISION_LANGUAGE:
            if fam.library == lib and name in fam.models:
                return fam
    return None


def family_named(label: str) -> Family:
    """The entry of FAMILIES with this label."""
    return next(f for f in FAMILIES if f.label == label)


def refusal(model: object) -> str | None:
    """Why ``model`` is refused, if its class (or a base class) is known to be unprunable."""
    for key in _mro(model):
        if key in REFUSED:
            return REFUSED[key]
    return None


def adapter(family: Family) -> Adapter:
    """The adapter of ``family``'s library (imports that library)."""
    return importlib.import_module(_ADAPTERS[family.library]).ADAPTER


@dataclass(frozen=True, eq=False)
class Encoder:
    """A model of one of the families, looked up once: its family and adapter, the module that holds its
    blocks, and what the blocks' inputs hold."""

    family: Family
    adapter: Adapter
    model: nn.Module  # the model ``patch`` was given
    encoder: nn.Module  # the module that holds the blocks and whose forward is one call
    blocks: tuple[nn.Module, ...]
    num_prefix: int  # tokens before the patches (class, distillation, registers)
    class_token: bool
    unit: int  # patches per selection unit (merged tokens are kept or dropped whole)
    full_attention: tuple[int, ...] | None  # the blocks that attend over each whole image; None: all do


def describe(model: object) -> Encoder:
    """The registry's view of ``model``, or a TypeError naming its class and why it is not taken."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.patch expects a torch.nn.Module, got {type(model).__name__}")
    reason = refusal(model)
    if reason:
        raise TypeError(f"pruneattn.patch does not support {type(model).__name__}: {reason}")
    family = family_of(model)
    if family is None:
        hint = ""
        if hasattr(model, "module") or hasattr(model, "_orig_mod"):
            hint = " (patch the model before wrapping it in DistributedDataParallel / torch.compile)"
        raise TypeError(f"pruneattn.patch does not support {type(model).__name__}{hint}; supported: {supported_text()}")
    lib = adapter(family)
    encoder = lib.encoder(family, model)
    class_token = family.class_token if family.class_token is not None else lib.has_class_token(family, model)
    return Encoder(
        family, lib, model, encoder, tuple(blocks_of(family, encoder)), num_prefix(family, encoder), bool(class_token),
        unit_of(family, encoder), full_attention_blocks(family, encoder),
    )


def shape_of(family: Family, cls: type) -> BlockShape | None:
    """Where selection sits in a block of class ``cls`` of ``family`` (None: not one of its blocks)."""
    lib = cls.__module__.split(".")[0]
    return next((s for s in family.blocks if s.block == cls.__name__ and lib == family.library), None)


def supported_text() -> str:
    """One line per family, for error messages."""
    return "; ".join(f"{f.label} ({', '.join(f.models)})" for f in (*FAMILIES, *VISION_LANGUAGE))


def _class_token(f: Family) -> tuple[str, str]:
    if f.class_token is None:
        return "if the model has one", "`\"cls\"`, `\"mean\"` without one"
    return ("yes", "`\"cls\"`") if f.class_token else ("no", "`\"mean\"`")


def readme_table() -> str:
    """The table of supported model families of docs/models.md (a test checks that the page holds it)."""
    rows = ["| family | model classes (and subclasses) | blocks | class token | `query` default | covers |",
            "|---|---|---|---|---|---|"]
    for f in FAMILIES:
        token, query = _class_token(f)
        models = ", ".join(f"`{m}`" for m in f.models)
        blocks = ", ".join(f"`{s.block}`" for s in f.blocks)
        rows.append(f"| {f.label} | {models} | {blocks} | {token} | {query} | {f.covers} |")
    return "\n".join(rows)


def vision_language_table() -> str:
    """The table of supported vision-language models of docs/models.md (a test checks that the page holds it)."""
    rows = ["| family | model classes (and subclasses) | vision towers | covers |", "|---|---|---|---|"]
    for f in VISION_LANGUAGE:
        models = ", ".join(f"`{m}`" for m in f.models)
        towers = ", ".join(family_named(t).encoder[0] for t in f.towers)
        rows.append(f"| {f.label} | {models} | {towers} | {f.covers} |")
    return "\n".join(rows)


def refused_table() -> str:
    """The table of refused model classes and why of docs/models.md (a test checks that the page holds it)."""
    rows = ["| library | class (and subclasses) | why it is refused |", "|---|---|---|"]
    rows += [f"| {lib} | `{name}` | {why} |" for (lib, name), why in REFUSED.items()]
    return "\n".join(rows)
