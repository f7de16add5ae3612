"""The spatial-unit families through the default backend (the Triton kernels; their interpreter on a CPU)."""
from __future__ import annotations

import pruneattn
from model_reference import one_thread  # noqa: F401 (fixture)
from test_vlm_units import compare_with_reference


def test_internvl_small_config(device):
    """InternVL (class-token query, 2 x 2 units), tower head dim 16, against the reference."""
    import vlm_unit_models

    assert pruneattn.backend.backend_for(device) == "triton"
    compare_with_reference("internvl", {"keep_rate": 0.3}, vlm_unit_models.internvl(width=64), tolerance=1e-4)
