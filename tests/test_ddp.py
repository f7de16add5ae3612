"""DistributedDataParallel on the CPU (gloo, two processes) trains a patched model to identical weights,
the same weights as one process training on both ranks' data."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import pruneattn
from model_reference import one_thread  # noqa: F401 (autouse fixture)

WORLD = 2
STEPS = 3
PER_RANK = 4


def build() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=4)
    return pruneattn.patch(model, keep_rate=0.5, layers=(1,), mode="fuse")


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(PER_RANK, 3, 32, 32, generator=g), torch.randint(0, 4, (PER_RANK,), generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pruneattn.use_backend("cpu"):
            for step in range(STEPS):
                x, y = data(step, rank)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_identical_weights(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process, both ranks' batches at once (the mean loss over 2 x 4 = DDP's averaged gradient)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pruneattn.use_backend("cpu"):
        for step in range(STEPS):
            x, y = (torch.cat(t) for t in zip(*(data(step, r) for r in range(WORLD))))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    initial = build().state_dict()
    assert states[0].keys() == states[1].keys() == initial.keys()
    for name in initial:
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], model.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(states[0][n], initial[n]) for n in initial)  # it did train
