"""Test set-up: without a GPU, run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton defines the kernels, i.e. before pruneattn is imported.
The repository root goes on ``sys.path`` (last) for the tests of ``tools/``.
"""
import os
import sys
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
# The developer tools (tools/, not installed with the package) import from the repository root.
sys.path.append(str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run in this session: the GPU, or the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def cpu_backend():
    """Run pruneattn's functions on the fast CPU path (not the Triton interpreter) inside the test."""
    import pruneattn

    with pruneattn.use_backend("cpu"):
        yield


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
