"""Launch settings shared by the kernels: autotune configs and their pruning."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import triton

from pruneattn.backend import interpreting

# Triton's dtype for each torch dtype the kernels accept (fp64 is not supported by the kernels).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Every head dim in [MIN_HEAD_DIM, MAX_HEAD_DIM] runs: the kernels pad it to a power of two of at least
# 16 (what ``tl.dot`` needs) in registers only, with masked loads and stores.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def configs(candidates: list[triton.Config]) -> list[triton.Config]:
    """Autotune candidates, pinned to the first one under the interpreter (nothing to tune there)."""
    return candidates[:1] if interpreting() else candidates


# float32 runs ``tl.dot`` as IEEE FMAs, not on tensor cores: both operands of every product sit in
# registers, so it needs much smaller tiles than 16-bit inputs. Compiled for sm_80 / sm_90, the 16-bit
# tiles spill kilobytes per thread in float32 (the GPU build report, ``python -m tools.gpu_build --build``);
# these do not, from d = 16 to 256.
def _cfg(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


FP32_ATTENTION_CONFIGS = [_cfg(16, 16, 4, 1), _cfg(16, 32, 4, 2), _cfg(32, 16, 4, 2)]
FP32_COLUMN_CONFIGS = [_cfg(16, 32, 4, 2), _cfg(32, 32, 4, 2), _cfg(32, 16, 4, 2)]
# The largest BLOCK_M * BLOCK_N * BLOCK_D of a float32 attention tile that compiles without spills.
FP32_ATTENTION_TILE = 16 * 32 * 64
# The most float32 values per thread of a 16-bit attention tile's logits and accumulator,
# (BLOCK_M * BLOCK_N + BLOCK_M * BLOCK_D) / (32 * num_warps): above it the tiles spill on sm_80 / sm_90
# (128 rows on 4 warps from d = 40, 128 x 128 tiles from d = 72); d = 256 keeps the smallest such tile.
HALF_ATTENTION_TILE = 96

SmemEstimate = Callable[[triton.Config, int, Mapping[str, object]], int]
_SCRATCH = 2048  # barriers, reduction scratch and static shared memory beside the tiles


def attention_smem(config: triton.Config, element_size: int, constexprs: Mapping[str, object]) -> int:
    """Shared memory of the fused attention kernel, an upper bound: the Q tile, ``num_stages`` buffers
    of the K and V tiles, and in float32 the probabilities tile (the FMA dot reads it from shared memory)."""
    m, n, d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], int(constexprs["BLOCK_D"])
    tiles = m * d + config.num_stages * 2 * n * d + (m * n if element_size == 4 else 0)
    return element_size * tiles + _SCRATCH


def column_smem(config: triton.Config, element_size: int, constexprs: Mapping[str, object]) -> int:
    """Shared memory of the column-mean kernel, an upper bound: ``num_stages`` Q tiles and the K tile."""
    m, n, d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], int(constexprs["BLOCK_D"])
    return element_size * (config.num_stages * m * d + d * n) + _SCRATCH


def _key(c: triton.Config) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def fitting(
    configs: Sequence[triton.Config], estimate: SmemEstimate, element_size: int,
    constexprs: Mapping[str, object], limit: int | None,
) -> list[triton.Config]:
    """The configs whose estimated shared memory is within ``limit`` (all if ``None``); the smallest if none is."""
    if limit is None:
        return list(configs)
    kept = [c for c in configs if estimate(c, element_size, constexprs) <= limit]
    return kept or [min(configs, key=lambda c: estimate(c, element_size, constexprs))]


def _smallest(
    configs: Sequence[triton.Config], measure: Callable[[triton.Config], int], limit: int
) -> list[triton.Config]:
    """The configs with ``measure <= limit``; if none, those at the smallest measure."""
    kept = [c for c in configs if measure(c) <= limit]
    if kept:
        return kept
    low = min(measure(c) for c in configs)
    return [c for c in configs if measure(c) == low]


def for_dtype(
    configs: Sequence[triton.Config], element_size: int, constexprs: Mapping[str, object],
    fp32: Sequence[triton.Config], fp32_tile: int | None = None, half_tile: int | None = None,
) -> list[triton.Config]:
    """The candidates meant for the element size: the ``fp32`` ones for 4-byte (and wider) elements,
    within ``fp32_tile`` (BLOCK_M * BLOCK_N * BLOCK_D); the others for 16-bit inputs, within
    ``half_tile`` float32 values per thread in the logits and accumulator tiles."""
    wide = {_key(c) for c in fp32}
    d = int(constexprs["BLOCK_D"])
    if element_size < 4:
        mine = [c for c in configs if _key(c) not in wide] or list(configs)
        if half_tile is None:
            return mine
        def per_thread(c: triton.Config) -> int:
            return c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + d) // (32 * c.num_warps)

        return _smallest(mine, per_thread, half_tile)
    mine = [c for c in configs if _key(c) in wide] or list(configs)
    if fp32_tile is None:
        return mine
    return _smallest(mine, lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * d, fp32_tile)


def device_smem_limit(device: torch.device) -> int | None:
    """Shared memory one CTA may use on ``device`` (the opt-in maximum); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    return _smem_limit(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


@dataclass(frozen=True)
class ConfigPrune:
    """The autotuner's ``early_config_prune``: the candidates for the dtype of ``tensor`` (within the
    tile limits, see :func:`for_dtype`), then those whose ``estimate`` of shared memory fits the device,
    keeping at least one.

    :meth:`for_limit` applies the same rule for any shared-memory limit and :meth:`for_element` gives
    the dtype's candidates before any limit, so that a build for a GPU that is not present can ask
    which candidates that GPU would keep.
    """

    estimate: SmemEstimate
    fp32: tuple[triton.Config, ...]
    fp32_tile: int | None = None
    half_tile: int | None = None
    tensor: str = "Q"

    def __call__(self, configs: Sequence[triton.Config], named_args: Mapping[str, object], **kwargs: object) -> list[triton.Config]:
        t = named_args[self.tensor]
        return self.for_limit(configs, t.element_size(), kwargs, device_smem_limit(t.device))

    def for_limit(self, configs: Sequence[triton.Config], element_size: int, constexprs: Mapping[str, object],
                  limit: int | None) -> list[triton.Config]:
        """The candidates kept for ``element_size`` with ``limit`` bytes of shared memory (``None``: no limit)."""
        mine = for_dtype(configs, element_size, constexprs, self.fp32, self.fp32_tile, self.half_tile)
        return fitting(mine, self.estimate, element_size, constexprs, limit)

    def for_element(self, configs: Sequence[triton.Config], element_size: int,
                    constexprs: Mapping[str, object]) -> list[triton.Config]:
        """The candidates meant for ``element_size``, before the tile and shared-memory limits."""
        return for_dtype(configs, element_size, constexprs, self.fp32)


def prune_by(
    estimate: SmemEstimate, fp32: Sequence[triton.Config], fp32_tile: int | None = None,
    half_tile: int | None = None, tensor: str = "Q",
) -> dict:
    """``prune_configs_by`` for ``triton.autotune``: a :class:`ConfigPrune` as its ``early_config_prune``."""
    return {"early_config_prune": ConfigPrune(estimate, tuple(fp32), fp32_tile, half_tile, tensor)}


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_d(head_dim: int) -> int:
    """The register width of a head dim: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_pow2(head_dim))
