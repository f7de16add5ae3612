"""Model-level pytest-benchmark suite (GPU; a tiny DeiT under the interpreter with PRUNEATTN_BENCH_SMOKE=1).

    pytest benchmarks/bench_models.py --benchmark-group-by=group --benchmark-columns=median,ops

timm DeiT-T/S/B at 224 and ViT-B/16 at 384, batch 1 and a batch that fills the GPU: unpatched vs
pruneattn (var, mad; keep 0.7 / 0.5; drop / fuse) vs the EViT-style eager patch; inference and one
training step. ``pruneattn bench --models`` adds images/s, peak memory and the FLOP-count bounds.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before pruneattn's kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pruneattn.bench.timing import sync  # noqa: E402
from pruneattn.bench import models as M  # noqa: E402
from pruneattn.bench import models_gpu as G  # noqa: E402

SMOKE = os.environ.get("PRUNEATTN_BENCH_SMOKE", "0") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = SMOKE or DEVICE.type != "cuda"
CASES = G.SMOKE_CASES if SMALL else G.CASES
CONFIGS = G.SMOKE_CONFIGS if SMALL else G.CONFIGS
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
_cache: dict = {}


def _model(name, size, config):
    key = (name, size, config)
    if key not in _cache:
        _cache.clear()
        _cache[key] = M.build(name, config, device=DEVICE, dtype=DTYPE, img_size=size)
    return _cache[key]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name.replace(" ", "-"))
@pytest.mark.parametrize("batch", ["fill", 1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_inference(benchmark, case, batch, config):
    name, size, fill = case
    b = fill if batch == "fill" else 1
    model = _model(name, size, config)
    x = M.images(b, size, device=DEVICE, dtype=DTYPE)
    benchmark.group = f"inference {name} {size} batch {b}"

    def run():
        with torch.no_grad(), M.forward_context(config):
            model(x)
        sync()

    run()
    benchmark(run)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.patched or c.mode == "drop"][: 2 if SMALL else None],
                         ids=lambda c: c.name.replace(" ", "-"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_train_step(benchmark, case, config):
    name, size, fill = case
    b = 2 if SMALL else max(1, fill // 4)
    model = M.build(name, config, device=DEVICE, img_size=size).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = M.images(b, size, device=DEVICE)
    step = G._train_step(model, x, opt, config, DEVICE)
    benchmark.group = f"train step {name} {size} batch {b}"

    def run():
        step()
        sync()

    run()
    benchmark(run)
