"""GPU architectures the kernels are built for, their per-SM limits, and the occupancy they allow.

The limits are NVIDIA's published figures (CUDA programming guide, "Compute capabilities" table).
Occupancy is the number of CTAs (programs) one SM can hold at once, the minimum of four limits:

- registers: ``floor(floor(65536 / ceil_256(regs * 32)) / num_warps)``: registers are allocated
  per warp in units of 256, and a CTA needs all its warps' registers;
- shared memory: ``floor(smem_per_sm / (smem + 1024))``: the CUDA runtime reserves 1 KB per CTA;
- threads: ``floor(2048 / (32 * num_warps))``;
- the hardware cap of 32 CTAs per SM.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["ARCHS", "Arch", "occupancy"]


@dataclass(frozen=True)
class Arch:
    """One compile target and its per-SM / per-CTA limits."""

    name: str  # "sm_90"
    gpu: str  # the data-center part it stands for
    capability: int  # 90
    smem_per_block: int  # the opt-in maximum of dynamic + static shared memory per CTA, bytes
    smem_per_sm: int
    sms: int  # streaming multiprocessors of that part
    tensor_core_ops: tuple[str, ...]  # PTX instruction prefixes of 16-bit tensor-core MMAs, preferred first
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    threads_per_sm: int = 2048
    ctas_per_sm: int = 32
    reg_unit: int = 256  # registers are allocated per warp in multiples of this
    reserved_smem_per_cta: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)


ARCHS = {
    "sm_80": Arch("sm_80", "A100 SXM", 80, 166912, 167936, 108, ("mma.sync",)),
    "sm_90": Arch("sm_90", "H100 SXM", 90, 232448, 233472, 132, ("wgmma.mma_async", "mma.sync")),
    "sm_100": Arch("sm_100", "B200", 100, 232448, 233472, 148, ("tcgen05.mma", "wgmma.mma_async", "mma.sync")),
}


def occupancy(arch: Arch, regs: int, num_warps: int, smem: int) -> dict:
    """CTAs per SM allowed by each limit and overall, with the limiting one(s) named."""
    warp_regs = math.ceil(max(regs, 1) * 32 / arch.reg_unit) * arch.reg_unit
    by = {
        "registers": (arch.regs_per_sm // warp_regs) // num_warps,
        "shared_memory": arch.smem_per_sm // (smem + arch.reserved_smem_per_cta),
        "threads": arch.threads_per_sm // (32 * num_warps),
        "cta_cap": arch.ctas_per_sm,
    }
    ctas = min(by.values())
    return {
        "ctas_per_sm": ctas,
        "warps_per_sm": ctas * num_warps,
        "warp_occupancy": ctas * num_warps * 32 / arch.threads_per_sm,
        "by": by,
        "limited_by": [k for k, v in by.items() if v == ctas],
    }
