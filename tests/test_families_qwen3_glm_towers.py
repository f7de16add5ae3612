"""The vision towers of Qwen3-VL (and -MoE, with DeepStack), Qwen3.5 (and -MoE) and GLM-4.1V / 4.5V / 4.6V:
images of any size packed in one sequence, whole 2 x 2 units kept per image.

The truth is each image (each frame of a video) run ALONE through an eager pruned forward: the
tower's own embeddings (learned position embeddings interpolated to the image, GLM's post-conv norm),
then the blocks of merged_reference.py (plain softmax attention in float64 over the image's remaining
tokens with the rotary tables applied by hand at each token's original position, and in each pruning
block the unit score of the spec, top-k units with ties to the lower index, the MLP on the kept
tokens). DeepStack features are the extra mergers run on the tokens remaining after their block,
then restricted to the units kept in the end; the main features are the merger (GLM: post-norm,
2 x 2 strided downsample of each unit, merger) on the kept tokens. The patched tower, called on the
whole batch, must give the same ``pooler_output``, DeepStack features, ``kept_units`` and
``kept_indices``. Random weights from small configs, q / k scaled so that the scores differ.
"""
import pytest
import torch

import pruneattn
from merged_reference import checkpointed_grads, each_frame_alone, padded, pixels, pruned_blocks, sharpened
from model_reference import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")
from transformers.vision_utils import (  # noqa: E402
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

PATCH, TEMPORAL, MERGE, UNIT = 4, 2, 2, 4
DEEPSTACK = [0, 2, 4]  # of 5 blocks: before, between and after the pruning blocks of the cases below
# a wide image, an image of 9 units (odd), a video of two frames (Qwen), a 1-unit image
QWEN_GRIDS = [(1, 8, 12), (1, 6, 6), (2, 4, 6), (1, 2, 2)]
GLM_GRIDS = [(1, 8, 12), (1, 6, 6), (1, 4, 6), (1, 2, 2)]  # GLM's model hands its tower video frames one by one
KINDS = ["qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe", "glm4v", "glm4v-moe"]


def _classes(kind):
    if kind == "qwen3-vl":
        from transformers.models.qwen3_vl import configuration_qwen3_vl as c, modeling_qwen3_vl as m

        return c.Qwen3VLVisionConfig, m.Qwen3VLVisionModel
    if kind == "qwen3-vl-moe":
        from transformers.models.qwen3_vl_moe import configuration_qwen3_vl_moe as c, modeling_qwen3_vl_moe as m

        return c.Qwen3VLMoeVisionConfig, m.Qwen3VLMoeVisionModel
    if kind == "qwen3.5":
        from transformers.models.qwen3_5 import configuration_qwen3_5 as c, modeling_qwen3_5 as m

        return c.Qwen3_5VisionConfig, m.Qwen3_5VisionModel
    if kind == "qwen3.5-moe":
        from transformers.models.qwen3_5_moe import configuration_qwen3_5_moe as c, modeling_qwen3_5_moe as m

        return c.Qwen3_5MoeVisionConfig, m.Qwen3_5MoeVisionModel
    if kind == "glm4v":
        from transformers.models.glm4v import configuration_glm4v as c, modeling_glm4v as m

        return c.Glm4vVisionConfig, m.Glm4vVisionModel
    from transformers.models.glm4v_moe import configuration_glm4v_moe as c, modeling_glm4v_moe as m

    return c.Glm4vMoeVisionConfig, m.Glm4vMoeVisionModel


def _glm(kind):
    return kind.startswith("glm")


def _grids(kind):
    return GLM_GRIDS if _glm(kind) else QWEN_GRIDS


def _tower(kind, dtype=torch.float64, depth=5, heads=4, width=64, attn="sdpa", **extra):
    torch.manual_seed(0)
    config_class, model_class = _classes(kind)
    kw = dict(depth=depth, hidden_size=width, num_heads=heads, intermediate_size=96, out_hidden_size=48,
              patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
    if _glm(kind):
        kw.update(image_size=8 * PATCH)  # an 8 x 8 table of learned position embeddings
    else:
        kw.update(num_position_embeddings=64)
    if kind.startswith("qwen3-vl"):
        kw.update(deepstack_visual_indexes=DEEPSTACK)
    cfg = config_class(**{**kw, **extra})
    cfg._attn_implementation = attn
    tower = model_class(cfg).eval().to(dtype)
    return sharpened(tower)


def _pixels(grids, dtype=torch.float64, seed=1):
    return pixels(grids, 3 * TEMPORAL * PATCH * PATCH, dtype, seed)


def _embedded(tower, pixels, grid):
    """The tower's own embedding of one image (untouched by pruning): tokens and rotary (cos, sin)."""
    T = pixels.shape[0]
    pos = get_vision_position_ids(grid, MERGE)
    if hasattr(tower, "downsample"):  # GLM: post-conv norm, then learned positions resampled by its embeddings
        x = tower.post_conv_layernorm(tower.patch_embed(pixels))
        cos, sin = tower.rotary_pos_emb(x, pos)
        return tower.embeddings(x, torch.tensor([T]), grid, pos[:, 0], pos[:, 1]), (cos, sin)
    x = tower.patch_embed(pixels)
    index, weight = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
        align_corners=tower.interpolation_align_corners, spatial_merge_size=MERGE,
    )
    x = x + (tower.pos_embed(index) * weight[:, :, None]).sum(1).to(x.dtype)
    return x, tower.rotary_pos_emb(x, pos)


def _eager_image(tower, pixels, h, w, rates):
    """One image alone. Returns its merged kept units (raster order), its DeepStack features of those
    units and {block: kept units}."""
    x, rope = _embedded(tower, pixels, torch.tensor([[1, h, w]]))
    deep = list(getattr(tower, "deepstack_visual_indexes", []))
    stacks = []

    def deepstack(i, x, rows):  # the extra merger of block i on the tokens remaining after it
        if i in deep:
            stacks.append((tower.deepstack_merger_list[deep.index(i)](x), rows[::UNIT] // UNIT))

    x, rows, kept = pruned_blocks(tower, x, rope, rates, UNIT, after=deepstack)
    final = rows[::UNIT] // UNIT
    if hasattr(tower, "downsample"):  # GLM: each unit's 2 x 2 patches through the strided convolution
        y = tower.post_layernorm(x).view(-1, MERGE, MERGE, x.shape[-1]).permute(0, 3, 1, 2)
        merged = tower.merger(tower.downsample(y).flatten(1))
    else:
        merged = tower.merger(x)
    return merged, [f[torch.isin(units, final)] for f, units in stacks], kept


def _truth(tower, pixels, grids, rates):
    """Each frame alone: pooled rows in order, DeepStack features in order, per block the kept units per frame."""
    return each_frame_alone(lambda p, h, w: _eager_image(tower, p, h, w, rates), pixels, grids)


def _close(got, want, tol):
    """Equal to ``tol``, relative to the largest value of ``want`` (GLM's merged rows are about 1e-3)."""
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def _assert_features(got, want, want_deep, tol, cast=lambda t: t):
    """The tower output ``got``: its ``pooler_output`` and DeepStack features (none for the other towers),
    each through ``cast`` first."""
    _close(cast(got.pooler_output), want, tol)
    deep = getattr(got, "deepstack_features", [])
    for g, w in zip(deep, want_deep, strict=True):
        _close(cast(g), w, tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers, rate", [(None, 0.5), ([1, 3], 0.6), ([2, 4], 0.4)])
def test_pruned_tower_equals_each_image_alone(kind, layers, rate, cpu_backend):
    tower = _tower(kind)
    pixels, grid = _pixels(_grids(kind))
    blocks = [len(tower.blocks) - 1] if layers is None else layers  # by default the last block, which the merger reads
    want, want_deep, kept = _truth(tower, pixels, _grids(kind), {i: rate for i in blocks})
    pruneattn.patch(tower, keep_rate=rate, layers=layers)
    assert [i for i, b in enumerate(tower.blocks) if hasattr(b, "_pruneattn")] == blocks
    with torch.no_grad():
        got = tower(pixels, grid_thw=grid)
    _assert_features(got, want, want_deep, 1e-9)
    assert len(want_deep) == (3 if kind.startswith("qwen3-vl") else 0)
    found = pruneattn.kept_indices(tower)
    assert sorted(found) == blocks
    for layer in blocks:
        assert torch.equal(found[layer], padded(kept[layer])), layer
    assert torch.equal(got.kept_units, padded(kept[max(blocks)]))
    assert got.last_hidden_state.shape[0] == want.shape[0] * (1 if _glm(kind) else UNIT)


@pytest.mark.parametrize("kind", ["qwen3-vl", "qwen3.5", "glm4v"])
def test_tokens_per_image_and_eager_attention(kind, cpu_backend):
    tower = _tower(kind, attn="eager")
    pixels, grid = _pixels(_grids(kind))
    pruneattn.patch(tower, tokens=[5, 3], layers=[1, 3])
    with torch.no_grad():
        got = tower(pixels, grid_thw=grid)
    counts = (got.kept_units >= 0).sum(1).tolist()
    frames = [h * w // UNIT for t, h, w in _grids(kind) for _ in range(t)]
    assert counts == [min(3, n) for n in frames]  # at most 3 units per image; the 1-unit image keeps its unit
    want, want_deep, kept = _truth(tower, pixels, _grids(kind), {1: 5, 3: 3})
    # the unpatched blocks' eager attention takes its softmax in float32
    _assert_features(got, want, want_deep, 1e-5)
    for layer in (1, 3):
        assert torch.equal(pruneattn.kept_indices(tower)[layer], padded(kept[layer]))


@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_equals_unpatched(kind, cpu_backend):
    tower = _tower(kind)
    pixels, grid = _pixels(_grids(kind))
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid, output_hidden_states=True)
        pruneattn.patch(tower, keep_rate=1.0, layers=[1, 3])
        got = tower(pixels, grid_thw=grid, output_hidden_states=True)
    assert set(got) == set(ref) | {"kept_units"}
    for key, value in ref.items():
        pairs = zip(got[key], value, strict=True) if isinstance(value, (list, tuple)) else [(got[key], value)]
        for g, w in pairs:
            _close(g, w, 1e-12)
    units = [h * w // UNIT for t, h, w in _grids(kind) for _ in range(t)]
    assert (got.kept_units >= 0).sum(1).tolist() == units


@pytest.mark.parametrize("kind", KINDS)
def test_return_dict_false_and_checkpointed_training(kind, cpu_backend):
    tower = _tower(kind, dtype=torch.float32)
    pixels, grid = _pixels(_grids(kind), dtype=torch.float32)
    pruneattn.patch(tower, keep_rate=0.5, layers=[1, 3])
    deep = kind.startswith("qwen3-vl")
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid)
        as_tuple = tower(pixels, grid_thw=grid, return_dict=False, output_hidden_states=True)
    torch.testing.assert_close(as_tuple[1], want.pooler_output)
    if deep:  # (last_hidden_state, pooler_output, deepstack_features, hidden_states)
        assert all(torch.equal(g, w) for g, w in zip(as_tuple[2], want.deepstack_features, strict=True))
    assert len(as_tuple[-1]) == len(tower.blocks) + 1  # hidden states, untouched

    def loss():
        out = tower(pixels, grid_thw=grid)
        torch.testing.assert_close(out.pooler_output, want.pooler_output, rtol=1e-5, atol=1e-5)
        return out.pooler_output.square().sum() + sum(f.square().sum() for f in getattr(out, "deepstack_features", []))

    grads = checkpointed_grads(tower, loss)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen3-vl", "glm4v"])
def test_tower_compiles(kind, cpu_backend):
    tower = _tower(kind, dtype=torch.float32)
    pixels, grid = _pixels(_grids(kind)[:2], dtype=torch.float32)
    pruneattn.patch(tower, keep_rate=0.5, layers=[1, 3])
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid)
        kept = pruneattn.kept_indices(tower)
        got = torch.compile(tower, backend="eager")(pixels, grid_thw=grid)
    _assert_features(got, want.pooler_output, getattr(want, "deepstack_features", []), 1e-6)
    assert torch.equal(got.kept_units, want.kept_units)
    for layer, idx in pruneattn.kept_indices(tower).items():
        assert torch.equal(idx, kept[layer])


@pytest.mark.parametrize("kind, head_dim", [("qwen3-vl", 64), ("glm4v", 80)])
def test_tower_under_the_triton_interpreter(kind, head_dim, device):
    model = _tower(kind, torch.float32, width=2 * head_dim, heads=2)
    reference = _tower(kind, torch.float64, width=2 * head_dim, heads=2)
    pixels, grid = _pixels(_grids(kind))
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.5, layers=[1, 3])
        pruneattn.patch(reference, keep_rate=0.5, layers=[1, 3])
        with pruneattn.use_backend("triton"):
            got = model.to(device)(pixels.float().to(device), grid_thw=grid.to(device))
        with pruneattn.use_backend("cpu"):
            want = reference(pixels, grid_thw=grid)
    assert torch.equal(got.kept_units.cpu(), want.kept_units)
    _assert_features(got, want.pooler_output, getattr(want, "deepstack_features", []), 1e-4,
                     cast=lambda t: t.cpu().double())


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_leave_the_tower_untouched(kind):
    tower = _tower(kind, dtype=torch.float32)
    before = [type(m) for m in tower.modules()]
    with pytest.raises(ValueError, match="mode='fuse' is not available"):
        pruneattn.patch(tower, mode="fuse", layers=[3])
    with pytest.raises(ValueError, match="class token"):
        pruneattn.patch(tower, query="cls")
    with pytest.raises(ValueError, match=r"block indices in \[0, 5\)"):
        pruneattn.patch(tower, layers=[1, 5])
    with pytest.raises(ValueError, match="one per layer"):
        pruneattn.patch(tower, keep_rate=[0.5, 0.5])
    assert [type(m) for m in tower.modules()] == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tower.modules())
    dropout = _tower(kind, dtype=torch.float32, attention_dropout=0.1) if _glm(kind) else None
    if dropout is not None:  # GLM's attention applies the config's dropout in training
        with pytest.raises(ValueError, match="attention dropout"):
            pruneattn.patch(dropout)
        assert not any(hasattr(m, "_pruneattn") for m in dropout.modules())


@pytest.mark.parametrize("kind", ["qwen3-vl", "glm4v"])
def test_unpatch_restores_the_tower(kind, cpu_backend):
    tower = _tower(kind)
    pixels, grid = _pixels(_grids(kind))
    with torch.no_grad():
        want = tower(pixels, grid_thw=grid)
        pruneattn.patch(tower, keep_rate=0.5, layers=[1, 3])
        tower(pixels, grid_thw=grid)
        pruneattn.unpatch(tower)
        got = tower(pixels, grid_thw=grid)
    assert "kept_units" not in got
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tower.modules())
    assert all(not type(m).__name__.startswith("Pruned") for m in tower.modules())


def test_deepstack_features_in_an_unknown_form_raise(cpu_backend):
    tower = _tower("qwen3-vl")
    pixels, grid = _pixels(QWEN_GRIDS)
    pruneattn.patch(tower, keep_rate=0.5)

    def as_tuple(module, args, output):  # runs before pruneattn's own hook: the features no longer its list
        output["deepstack_features"] = tuple(output["deepstack_features"])
        return output

    tower.register_forward_hook(as_tuple, prepend=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="DeepStack features .* cannot be cut to the kept units"):
        tower(pixels, grid_thw=grid)
    with pytest.raises(RuntimeError, match="did not finish"):
        pruneattn.kept_indices(tower)
