"""Qwen2.5-VL's and Qwen2-VL's vision towers: images of any size packed in one sequence, 2 x 2 units,
window attention (Qwen2.5-VL).

The truth is each image (each frame of a video) run ALONE through the eager pruned forward of
merged_reference.py, set up here with the tower's window order: plain softmax attention with an
explicit mask (same image in full-attention blocks, same window in the others; windows and rotary
angles by plain indexing of each token's original position), and in each pruning block the unit
score of the spec (received attention averaged over the image's queries, summed over the unit's 4
patches, variance over heads), top-k units with ties to the lower index. The merged units are put
in raster order. The patched tower, called on the whole batch, must give the same ``pooler_output``
rows and ``kept_indices``. Random weights from a config, q / k scaled so that the scores differ.
"""
import pytest
import torch

import pruneattn
from merged_reference import checkpointed_grads, each_frame_alone, padded, pixels, pruned_blocks, sharpened
from model_reference import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel as Tower,
)
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index  # noqa: E402

PATCH, TEMPORAL, MERGE = 4, 2, 2
GRIDS = [(1, 8, 12), (1, 6, 4), (2, 4, 6), (1, 2, 2)]  # two windows across, a small image, a video, one unit


def _tower(dtype=torch.float64, depth=5, full=(1, 3), heads=4, width=64, attn="sdpa", kind="qwen2.5-vl"):
    torch.manual_seed(0)
    if kind == "qwen2-vl":  # no windows, LayerNorm, every block attends over the whole image
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        cfg = Qwen2VLVisionConfig(depth=depth, embed_dim=width, hidden_size=48, num_heads=heads, mlp_ratio=2,
                                  patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
        cfg._attn_implementation = attn
        tower = Qwen2VisionTransformerPretrainedModel(cfg).eval().to(dtype)
    else:
        cfg = Qwen2_5_VLVisionConfig(
            depth=depth, hidden_size=width, num_heads=heads, intermediate_size=96, out_hidden_size=48,
            patch_size=PATCH, window_size=4 * PATCH * MERGE // 2, fullatt_block_indexes=list(full),
            temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE,
        )
        cfg._attn_implementation = attn
        tower = Tower(cfg).eval().to(dtype)
    return sharpened(tower)


def _pixels(grids, dtype=torch.float64, seed=1):
    return pixels(grids, 3 * TEMPORAL * PATCH * PATCH, dtype, seed)


def _eager_image(tower, pixels, h, w, rates):
    """One image alone. Returns its merged kept units (raster order), no extra features and
    {block: kept units, raster indices}."""
    grid = torch.tensor([[1, h, w]])
    unit = MERGE * MERGE
    T = pixels.shape[0]
    windows = getattr(tower, "window_size", None) is not None
    if windows:
        window_index, cu_windows = get_vision_window_index(grid, MERGE, tower.window_size, PATCH)
        full = tower.fullatt_block_indexes
    else:  # units in raster order, one "window": the image
        window_index, cu_windows, full = torch.arange(T // unit), torch.tensor([0, T]), range(len(tower.blocks))
    x = tower.patch_embed(pixels).view(T // unit, unit, -1)[window_index].reshape(T, -1)
    cos, sin = tower.rotary_pos_emb(x, get_vision_position_ids(grid, MERGE))
    cos, sin = (t.view(T // unit, unit, -1)[window_index].reshape(T, -1) for t in (cos, sin))
    window_of = torch.bucketize(torch.arange(T), cu_windows[1:], right=True)  # each token's window
    x, rows, kept = pruned_blocks(tower, x, (cos, sin), rates, unit, window_of, full)
    kept = {i: sorted(int(window_index[u]) for u in units) for i, units in kept.items()}
    merged = tower.merger(x)
    raster = window_index[rows[::unit] // unit]
    return merged[raster.argsort()], [], kept


def _truth(tower, pixels, grids, rates):
    """Each frame alone; its pooled rows in order, and per block the kept units per frame."""
    merged, _, kept = each_frame_alone(lambda p, h, w: _eager_image(tower, p, h, w, rates), pixels, grids)
    return merged, kept


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen2-vl"])
@pytest.mark.parametrize("layers, rate", [([1], 0.5), ([1, 3], 0.6), ([3], 0.3)])
def test_pruned_tower_equals_each_image_alone(layers, rate, kind, cpu_backend):
    tower = _tower(kind=kind)
    pixels, grid = _pixels(GRIDS)
    want, kept = _truth(tower, pixels, GRIDS, {i: rate for i in layers})
    pruneattn.patch(tower, keep_rate=rate, layers=layers)
    with torch.no_grad():
        got = tower(pixels, grid_thw=grid)
    torch.testing.assert_close(got.pooler_output, want, rtol=1e-9, atol=1e-9)
    found = pruneattn.kept_indices(tower)
    assert sorted(found) == layers
    for layer in layers:
        assert torch.equal(found[layer], padded(kept[layer])), layer
    assert torch.equal(got.kept_units, padded(kept[max(layers)]))  # the call's own units, with its output
    assert got.last_hidden_state.shape[0] == 4 * want.shape[0]


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen2-vl"])
def test_keep_all_equals_unpatched(kind, cpu_backend):
    tower = _tower(kind=kind)
    pixels, grid = _pixels(GRIDS)
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid, output_hidden_states=True)
        pruneattn.patch(tower, keep_rate=1.0, layers=[1, 3])
        got = tower(pixels, grid_thw=grid, output_hidden_states=True)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-12, atol=1e-12)
    assert len(got.hidden_states) == len(ref.hidden_states)
    units = [h * w // 4 for t, h, w in GRIDS for _ in range(t)]
    assert (pruneattn.kept_indices(tower)[3] >= 0).sum(1).tolist() == units


def test_tokens_per_image_and_eager_attention(cpu_backend):
    tower = _tower(attn="eager")
    pixels, grid = _pixels(GRIDS)
    pruneattn.patch(tower, tokens=3, layers=[1])
    with torch.no_grad():
        got = tower(pixels, grid_thw=grid)
    counts = (pruneattn.kept_indices(tower)[1] >= 0).sum(1).tolist()
    assert counts == [3, 3, 3, 3, 1]  # at most 3 units per image; the one-unit image keeps its unit
    want, kept = _truth(tower, pixels, GRIDS, {1: 3})
    # the unpatched blocks' eager attention takes its softmax in float32
    torch.testing.assert_close(got.pooler_output, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(pruneattn.kept_indices(tower)[1], padded(kept[1]))
    pruneattn.unpatch(tower)
    assert type(tower.blocks[1]).__name__ == "Qwen2_5_VLVisionBlock"


def test_default_layers_and_refusals():
    tower = _tower(depth=8, full=(1, 3, 5, 7))
    pruneattn.patch(tower)
    assert [i for i, b in enumerate(tower.blocks) if hasattr(b, "_pruneattn")] == [1, 3, 5]  # near 2, 4, 6
    with pytest.raises(ValueError, match=r"layers \[2\] .* attend within windows"):
        pruneattn.patch(tower, layers=[1, 2])
    with pytest.raises(ValueError, match="mode='fuse' is not available"):
        pruneattn.patch(tower, mode="fuse", layers=[1])
    with pytest.raises(ValueError, match="class token"):
        pruneattn.patch(tower, query="cls", layers=[1])
    assert [i for i, b in enumerate(tower.blocks) if hasattr(b, "_pruneattn")] == [1, 3, 5]  # untouched
    windows_only = _tower(depth=2, full=(7, 15))  # transformers' default full blocks, beyond a 2-block tower
    for kw in ({}, {"keep_rate": 1.0}):
        with pytest.raises(ValueError, match=r"no full-attention block among its 2 blocks .*\[7, 15\]"):
            pruneattn.patch(windows_only, **kw)
    assert not any(hasattr(b, "_pruneattn") for b in windows_only.blocks)


def test_return_dict_false_and_checkpointed_training(cpu_backend):
    tower = _tower(dtype=torch.float32)
    pixels, grid = _pixels(GRIDS, dtype=torch.float32)
    pruneattn.patch(tower, keep_rate=0.5, layers=[1, 3])
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid).pooler_output
        as_tuple = tower(pixels, grid_thw=grid, return_dict=False)
    torch.testing.assert_close(as_tuple[1], want)

    def loss():
        out = tower(pixels, grid_thw=grid).pooler_output
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        return out.square().sum()

    grads = checkpointed_grads(tower, loss)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_tower_under_the_triton_interpreter(device):
    # head dim 80, as the real tower's 16 heads of 80
    model = _tower(torch.float32, width=160, heads=2)
    reference = _tower(torch.float64, width=160, heads=2)
    pixels, grid = _pixels(GRIDS, dtype=torch.float32)
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.5, layers=[1, 3])
        pruneattn.patch(reference, keep_rate=0.5, layers=[1, 3])
        with pruneattn.use_backend("triton"):
            got = model.to(device)(pixels.to(device), grid_thw=grid.to(device))
        with pruneattn.use_backend("cpu"):
            want = reference(pixels.double(), grid_thw=grid)
    assert torch.equal(pruneattn.kept_indices(model)[3].cpu(), pruneattn.kept_indices(reference)[3])
    torch.testing.assert_close(got.pooler_output.cpu().double(), want.pooler_output, rtol=1e-4, atol=1e-4)


def test_tower_compiles(cpu_backend):
    tower = _tower(dtype=torch.float32, depth=4)
    pixels, grid = _pixels(GRIDS[:2], dtype=torch.float32)
    pruneattn.patch(tower, keep_rate=0.5, layers=[1, 3])
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid).pooler_output
        kept = pruneattn.kept_indices(tower)
        got = torch.compile(tower, backend="eager")(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(got, want)
    for layer, idx in pruneattn.kept_indices(tower).items():
        assert torch.equal(idx, kept[layer])
