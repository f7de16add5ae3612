"""Environment switches read by the dispatcher and the kernels."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so set it before importing ``pruneattn``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
