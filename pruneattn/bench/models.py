"""Model-level benchmarks: timm ViTs unpatched vs patched by pruneattn vs an EViT-style eager patch.

- ``unpatched``: the timm model as is (its fused SDPA attention everywhere).
- ``pruneattn ...``: ``pruneattn.patch(model, keep_rate, layers, stat, mode=...)``; the pruning blocks
  run attention + scores through pruneattn (Triton kernels on a GPU, the fast CPU path on a CPU).
- ``EViT-style eager``: the same patched model run under ``pruneattn.use_backend("reference")``: its
  pruning blocks compute the N x N softmax matrix eagerly to get the scores (what EViT-style code does
  because fused attention hides the weights); the other blocks keep timm's fused attention.

The FLOP-count bound of a configuration is (matmul FLOPs of the unpatched model) / (matmul FLOPs of
the patched one), counting each block with the tokens it actually sees (the attention of a pruning
block on all its input tokens, its MLP on the kept ones): the speed-up a perfect implementation whose
time is proportional to FLOPs would reach.
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


def build(name: str, config: Config, device="cpu", dtype=torch.float32, img_size: int | None = None, **kw) -> torch.nn.Module:
    """A timm model (``pretrained=False``: no network) in eval mode, patched as ``config`` says."""
    import timm

    if img_size is not None:
        kw["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, **kw).eval().to(device=device, dtype=dtype)
    if config.patched:
        pruneattn.patch(model, keep_rate=config.keep_rate, layers=config.layers, stat=config.stat, mode=config.mode)
    return model


def forward_context(config: Config):
    """``use_backend("reference")`` for the EViT-style patch, nothing otherwise."""
    return pruneattn.use_backend("reference") if config.eager else contextlib.nullcontext()


def model_shape(model: torch.nn.Module) -> dict:
    """What the FLOP count needs from a timm VisionTransformer."""
    pe = model.patch_embed
    grid = pe.grid_size
    return {
        "depth": len(model.blocks),
        "dim": model.embed_dim,
        "mlp_hidden": model.blocks[0].mlp.fc1.out_features,
        "num_patches": grid[0] * grid[1],
        "num_prefix": model.num_prefix_tokens,
        "patch_in": pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1],
        "num_classes": model.num_classes,
    }


def token_schedule(shape: dict, config: Config) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of each block."""
    n_prefix, P = shape["num_prefix"], shape["num_patches"]
    fused = 0
    out = []
    layers = set(config.layers) if config.patched else set()
    for i in range(shape["depth"]):
        n_in = n_prefix + P + fused
        if i in layers and config.keep_rate < 1.0:
            P = num_kept(P, keep_rate=config.keep_rate)
            if config.mode == "fuse":
                fused = 1
        out.append((n_in, n_prefix + P + fused))
    return out


def block_flops(n_attn: int, n_mlp: int, dim: int, hidden: int) -> int:
    """Matmul FLOPs of one block per image: qkv, Q K^T, P V, proj on n_attn tokens; fc1, fc2 on n_mlp."""
    return 2 * n_attn * dim * 3 * dim + 4 * n_attn * n_attn * dim + 2 * n_attn * dim * dim + 4 * n_mlp * dim * hidden


def model_flops(shape: dict, config: Config) -> int:
    embed = 2 * shape["num_patches"] * shape["patch_in"] * shape["dim"]
    head = 2 * shape["dim"] * shape["num_classes"]
    blocks = sum(block_flops(a, m, shape["dim"], shape["mlp_hidden"]) for a, m in token_schedule(shape, config))
    return embed + blocks + head


def flop_bound(shape: dict, config: Config) -> float:
    """Speed-up over the unpatched model that a time-proportional-to-FLOPs implementation reaches."""
    return model_flops(shape, UNPATCHED) / model_flops(shape, config)


def images(batch: int, img_size: int, device="cpu", dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g).to(device=device, dtype=dtype)


def check_tokens(model: torch.nn.Module, config: Config, shape: dict, x: torch.Tensor) -> None:
    """Check the patched model really runs the token schedule the FLOP count assumes."""
    if not config.patched:
        return
    with torch.no_grad(), forward_context(config):
        model(x[:1])
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
    x = images(batch, img_size, device=device, dtype=dtype)
    for c in configs:
        check_tokens(built[c.name], c, shape, x)

    def forward(c: Config):
        model = built[c.name]

        def run():
            with torch.no_grad(), forward_context(c):
                return model(x)
        return run

    return built, shape, x, {c.name: forward(c) for c in configs}

