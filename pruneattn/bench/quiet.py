"""Silence the known log lines that torch's profiler writes from C++ on a machine without a GPU.

``torch.profiler`` (Kineto) logs ``USDT: ... profiler_start`` / ``profiler_stop``, ``gpuGetDeviceCount failed``
and c10's ``CPUAllocator`` warning about blocks allocated before profiling straight to file descriptor 2,
bypassing Python's ``sys.stderr`` and ``warnings``. :func:`profiler_noise_filtered` captures that descriptor
around a block and writes back every line that is not one of those.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

NOISE = re.compile(
    r"^(USDT:.*SyncActivityProfilerHandler"
    r"|ERROR:.*gpuGetDeviceCount failed"
    r"|\[W\d+ [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling started"
    r")")


def drop_noise(text: str) -> str:
    """``text`` without the profiler's known noise lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.match(line))


@contextlib.contextmanager
def profiler_noise_filtered() -> Iterator[None]:
    """Run the block with file descriptor 2 captured; afterwards re-emit what it wrote, less the noise."""
    fd = 2  # where C++ writes, whatever Python's sys.stderr is
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            rest = drop_noise(tmp.read().decode("utf-8", "replace"))
            if rest:
                os.write(fd, rest.encode("utf-8"))
