"""Model-level benchmarks: ViTs unpatched vs patched by pruneattn vs an EViT-style eager patch.

Models: timm names (``VisionTransformer`` and the ``Eva`` family, e.g. ``vit_small_patch16_rope_224``)
and the Hugging Face encoders named in :data:`HF_MODELS` (``hf:clip_vit_b16``: a CLIP ViT-B/16 vision
encoder built from its config; ``hf:dinov3_vits16``: DINOv3-S/16 with 4 registers and rotary
embedding; ``hf:siglip2_b16_naflex``: SigLIP2-B/16 fed a batch of images of different sizes, padded to
``(img_size / 16) ** 2`` patches with its padding mask), all with random weights (no network).

- ``unpatched``: the timm model as is (its fused SDPA attention everywhere).
- ``pruneattn ...``: ``pruneattn.patch(model, keep_rate, layers, stat, mode=...)``; the pruning blocks
  run attention + scores through pruneattn (Triton kernels on a GPU, the fast CPU path on a CPU).
- ``EViT-style eager``: the same patched model run under ``pruneattn.use_backend("reference")``: its
  pruning blocks compute the N x N softmax matrix eagerly to get the scores (what EViT-style code does
  because fused attention hides the weights); the other blocks keep timm's fused attention.

The FLOP-count bound of a configuration is (matmul FLOPs of the unpatched model) / (matmul FLOPs of
the patched one), counting each block with the tokens it actually sees (the attention of a pruning
block on all its input tokens, its MLP on the kept ones): the speed-up a perfect implementation whose
time is proportional to FLOPs would reach. In a padded batch both models compute on the padded width:
the unpatched one on every padded patch, the patched one on the widest image's kept patches after
each pruning block (each image keeping ceil(rate * its own real patches)). An attention-pooling head
(SigLIP's one-query pooling, under 1% of the model) and SigLIP2's per-image resize of its position
embeddings are not counted.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import pruneattn
from pruneattn.validate import num_kept


@dataclass(frozen=True)
class Config:
    name: str
    patched: bool = False
    eager: bool = False
    stat: str = "var"
    keep_rate: float = 0.7
    mode: str = "drop"
    layers: tuple[int, ...] = (3, 6, 9)

    def label(self) -> str:
        return self.name


UNPATCHED = Config("unpatched")


def pruned(stat: str = "var", keep_rate: float = 0.7, mode: str = "drop", layers=(3, 6, 9)) -> Config:
    return Config(f"pruneattn {stat} {keep_rate} {mode}", True, False, stat, keep_rate, mode, tuple(layers))


def evit_style(stat: str = "var", keep_rate: float = 0.7, mode: str = "drop", layers=(3, 6, 9)) -> Config:
    return Config(f"EViT-style eager {stat} {keep_rate} {mode}", True, True, stat, keep_rate, mode, tuple(layers))


# Hugging Face vision encoders by benchmark name: (model class, config class, config kwargs).
HF_MODELS = {
    "hf:clip_vit_b16": ("CLIPVisionModel", "CLIPVisionConfig", {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "patch_size": 16, "image_size": 224,
    }),
    "hf:dinov3_vits16": ("DINOv3ViTModel", "DINOv3ViTConfig", {
        "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
        "patch_size": 16, "image_size": 224, "num_register_tokens": 4,
    }),
    "hf:siglip2_b16_naflex": ("Siglip2VisionModel", "Siglip2VisionConfig", {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "patch_size": 16, "num_patches": 256,
    }),
}
# Patch grids (rows, cols) of the images in a padded batch, cycled for larger batches: 256 x 256,
# 224 x 288, 192 x 256, 160 x 320, 256 x 192, 128 x 384, 192 x 192 and 144 x 224 pixels at 16 px.
NAFLEX_GRIDS = ((16, 16), (14, 18), (12, 16), (10, 20), (16, 12), (8, 24), (12, 12), (9, 14))


def padded(name: str) -> bool:
    """Whether the model ``name`` is fed a padded batch of images of different sizes."""
    return name.endswith("_naflex")


def naflex_grids(batch: int, num_patches: int) -> list[tuple[int, int]]:
    """The patch grids of a padded batch: :data:`NAFLEX_GRIDS` cycled, each fitting ``num_patches``."""
    grids = [g for g in NAFLEX_GRIDS if g[0] * g[1] <= num_patches]
    if len(grids) < 2:  # a small model (tests, smoke runs): a full grid, two smaller ones and one patch
        side = math.isqrt(num_patches)
        grids = list(dict.fromkeys([(side, side), (max(1, side - 1), side), (max(1, side // 2), side), (1, 1)]))
    return [grids[i % len(grids)] for i in range(batch)]


def _hf_model(name: str, img_size: int | None) -> torch.nn.Module:
    import transformers

    model_cls, config_cls, kwargs = HF_MODELS[name]
    if img_size and padded(name):
        kwargs = {**kwargs, "num_patches": (img_size // kwargs["patch_size"]) ** 2}
    elif img_size:
        kwargs = {**kwargs, "image_size": img_size}
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "sdpa"  # the fast unpatched baseline
    return getattr(transformers, model_cls)(config)


def build(name: str, config: Config, device="cpu", dtype=torch.float32, img_size: int | None = None, **kw) -> torch.nn.Module:
    """A timm model or a Hugging Face encoder of :data:`HF_MODELS` (random weights: no network), in
    eval mode, patched as ``config`` says."""
    if name in HF_MODELS:
        model = _hf_model(name, img_size)
    else:
        import timm

        if img_size is not None:
            kw["img_size"] = img_size
        model = timm.create_model(name, pretrained=False, **kw)
    model = model.eval().to(device=device, dtype=dtype)
    if config.patched:
        pruneattn.patch(model, keep_rate=config.keep_rate, layers=config.layers, stat=config.stat, mode=config.mode)
    return model


def forward_context(config: Config):
    """``use_backend("reference")`` for the EViT-style patch, nothing otherwise."""
    return pruneattn.use_backend("reference") if config.eager else contextlib.nullcontext()


def _mlp_shape(mlp: torch.nn.Module) -> tuple[int, int]:
    """(hidden width, number of dim x hidden matrices): 2 for fc1/fc2, 3 for SwiGLU's gate too."""
    if hasattr(mlp, "fc1_g"):
        return mlp.fc1_g.out_features, 3
    if hasattr(mlp, "fc1") and isinstance(mlp.fc1, torch.nn.Linear):
        gated = mlp.fc1.out_features == 2 * mlp.fc2.in_features  # packed SwiGLU (fc1 -> gate, value)
        return mlp.fc2.in_features, 3 if gated else 2
    if hasattr(mlp, "up_proj") and isinstance(mlp.up_proj, torch.nn.Linear):  # Hugging Face DINOv3
        return mlp.up_proj.out_features, 3 if hasattr(mlp, "gate_proj") else 2
    raise TypeError(f"unknown MLP {type(mlp).__name__}")


def _family(model: torch.nn.Module):
    """The registry entry, encoder, blocks and prefix-token count of ``model``."""
    from pruneattn.patch import registry

    found = registry.describe(model)
    return found.family, found.encoder, list(found.blocks), found.num_prefix


def model_shape(model: torch.nn.Module) -> dict:
    """What the FLOP count needs: depth, width, MLP, patches, prefix tokens, patch size, classes."""
    family, encoder, blocks, num_prefix = _family(model)
    shape = family.blocks[0]
    hidden, mats = _mlp_shape(getattr(blocks[0], shape.mlp.module))
    if family.library == "timm":
        pe = model.patch_embed
        grid, conv, dim, classes = pe.grid_size, pe.proj, model.embed_dim, model.num_classes
        num_patches = grid[0] * grid[1]
    else:
        cfg = encoder.config
        emb = encoder.embeddings
        conv = getattr(emb, "patch_embeddings", None) or emb.patch_embedding
        conv = getattr(conv, "projection", conv)
        dim, classes = cfg.hidden_size, 0
        num_patches = cfg.num_patches if family.padding else (cfg.image_size // cfg.patch_size) ** 2
    patch_in = conv.in_features if isinstance(conv, torch.nn.Linear) else \
        conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    return {
        "depth": len(blocks), "dim": dim, "mlp_hidden": hidden, "mlp_mats": mats, "num_patches": num_patches,
        "num_prefix": num_prefix, "patch_in": patch_in, "num_classes": classes,
    }


def has_block_halves(model: torch.nn.Module) -> bool:
    """Whether :func:`block_halves` can time the model's blocks alone (not for Hugging Face rotary
    encoders, whose tables the layer is handed, nor for padded ones, whose mask it is)."""
    family = _family(model)[0]
    return not ((family.rotary and family.library == "transformers") or family.padding)


def block_halves(model: torch.nn.Module) -> tuple[object, object]:
    """``(attention half, MLP half)`` of the model's first (unpatched) block as functions of x (B, n, C):
    ``x + after(attn(norm1(x)))`` and ``x + after(mlp(norm2(x)))`` as its family's block shape names them,
    rotary embeddings applied where the family has them."""
    from pruneattn.patch.blocks import apply_after, part

    family, encoder, blocks, npt = _family(model)
    blk, shape = blocks[0], family.blocks[0]
    table = model.rope.get_embed() if family.rotary and getattr(model, "rope", None) is not None else None

    def half(res, x: torch.Tensor, **kw) -> torch.Tensor:
        h = x if res.norm is None else part(blk, res.norm)(x)
        y = part(blk, res.module)(h, **kw)
        return x + apply_after(blk, res.after, y[0] if isinstance(y, tuple) else y)

    def attn(x: torch.Tensor) -> torch.Tensor:
        return half(shape.attention, x, **({} if table is None else {"rope": table[: x.shape[1] - npt]}))

    return attn, lambda x: half(shape.mlp, x)


def token_schedule(shape: dict, config: Config) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of each block: per image, or for a padded batch
    (``shape["lengths"]``: each image's real patches) the batch's width."""
    n_prefix, P = shape["num_prefix"], shape["num_patches"]
    lengths = shape.get("lengths")
    fused = 0
    out = []
    layers = set(config.layers) if config.patched else set()
    for i in range(shape["depth"]):
        n_in = n_prefix + P + fused
        if i in layers and config.keep_rate < 1.0:
            if lengths is None:
                P = num_kept(P, keep_rate=config.keep_rate)
            else:
                lengths = [num_kept(p, keep_rate=config.keep_rate) if p else 0 for p in lengths]
                P = max(lengths)
            if config.mode == "fuse":
                fused = 1
        out.append((n_in, n_prefix + P + fused))
    return out


def block_flops(n_attn: int, n_mlp: int, dim: int, hidden: int, mlp_mats: int = 2) -> int:
    """Matmul FLOPs of one block per image: qkv, Q K^T, P V, proj on n_attn tokens; the MLP's
    ``mlp_mats`` dim x hidden matrices (fc1, fc2; SwiGLU's gate too) on n_mlp."""
    return (2 * n_attn * dim * 3 * dim + 4 * n_attn * n_attn * dim + 2 * n_attn * dim * dim
            + 2 * mlp_mats * n_mlp * dim * hidden)


def model_flops(shape: dict, config: Config) -> int:
    embed = 2 * shape["num_patches"] * shape["patch_in"] * shape["dim"]
    head = 2 * shape["dim"] * shape["num_classes"]
    blocks = sum(block_flops(a, m, shape["dim"], shape["mlp_hidden"], shape.get("mlp_mats", 2))
                 for a, m in token_schedule(shape, config))
    return embed + blocks + head


def flop_bound(shape: dict, config: Config) -> float:
    """Speed-up over the unpatched model that a time-proportional-to-FLOPs implementation reaches."""
    return model_flops(shape, UNPATCHED) / model_flops(shape, config)


def images(batch: int, img_size: int, device="cpu", dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g).to(device=device, dtype=dtype)


def inputs(name: str, batch: int, img_size: int, device="cpu", dtype=torch.float32, seed: int = 0) -> tuple:
    """The positional arguments of one forward of model ``name``: ``(images,)``, or for a padded model
    what SigLIP2's processor returns for :func:`naflex_grids` images: ``(pixel_values, pixel_attention_mask,
    spatial_shapes)``, pixel_values (B, N, 3 * 16 * 16) zero at padding."""
    if not padded(name):
        return (images(batch, img_size, device, dtype, seed),)
    patch = HF_MODELS[name][2]["patch_size"]
    N = (img_size // patch) ** 2
    grids = naflex_grids(batch, N)
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, N, dtype=torch.long)
    for b, (h, w) in enumerate(grids):
        mask[b, : h * w] = 1
    pixels = torch.randn(batch, N, 3 * patch * patch, generator=g) * mask[..., None]
    return (pixels.to(device=device, dtype=dtype), mask.to(device), torch.tensor(grids, device=device))


def lengths_of(x: tuple) -> list[int] | None:
    """Each image's real patches in a padded batch's inputs (None: not padded)."""
    return x[1].sum(dim=1).tolist() if len(x) == 3 else None


def first(x: tuple) -> tuple:
    """The inputs of the batch's first image only."""
    return tuple(t[:1] for t in x)


def training_loss(model: torch.nn.Module, x: torch.Tensor | tuple) -> torch.Tensor:
    """A loss for timing a training step: cross-entropy against fixed random labels for a classifier,
    the mean square of the pooled output for an encoder (Hugging Face models return no logits)."""
    out = model(*x) if isinstance(x, tuple) else model(x)
    if isinstance(out, torch.Tensor):
        target = torch.randint(0, out.shape[-1], (out.shape[0],), generator=torch.Generator().manual_seed(0))
        return torch.nn.functional.cross_entropy(out.float(), target.to(out.device))
    pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
    return pooled.float().square().mean()


def check_tokens(model: torch.nn.Module, config: Config, shape: dict, x: torch.Tensor | tuple) -> None:
    """Check the patched model really runs the token schedule the FLOP count assumes (a padded batch:
    all of it, its width depends on every image)."""
    if not config.patched:
        return
    x = x if isinstance(x, tuple) else (x,)
    with torch.no_grad(), forward_context(config):
        model(*(x if shape.get("lengths") else first(x)))
    idx = pruneattn.kept_indices(model)
    sched = token_schedule(shape, config)
    for layer in config.layers:
        expected = sched[layer][1] - shape["num_prefix"] - (1 if config.mode == "fuse" else 0)
        if idx[layer].shape[1] != expected:
            raise AssertionError(f"block {layer} kept {idx[layer].shape[1]} patches, the FLOP count assumes {expected}")


def round_sig(x: float, n: int = 4) -> float:
    return float(f"{x:.{n}g}") if x and math.isfinite(x) else x


def prepare(name: str, configs, batch: int, img_size: int, device="cpu", dtype=torch.float32):
    """Build one model per config, check each one's token counts on the same random images, and
    return ``(built, shape, x, forwards)`` with ``forwards[config name]()`` one no-grad forward."""
    built = {c.name: build(name, c, device=device, dtype=dtype, img_size=img_size) for c in configs}
    shape = model_shape(built[configs[0].name])
    x = inputs(name, batch, img_size, device=device, dtype=dtype)
    shape["lengths"] = lengths_of(x)
    for c in configs:
        check_tokens(built[c.name], c, shape, x)

    def forward(c: Config):
        model = built[c.name]

        def run():
            with torch.no_grad(), forward_context(c):
                return model(*x)
        return run

    return built, shape, x, {c.name: forward(c) for c in configs}  # x: the tuple of forward arguments

