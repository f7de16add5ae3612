"""Padded encoders: SigLIP2 NaFlex and the Idefics3 / SmolVLM vision towers, images of different sizes
in one batch.

The truth is each image run ALONE, unpadded and unmasked, through an eager pruned forward written
here (plain softmax attention over its real tokens, the spec's score, top-k with ties to the lower
index): the padded, patched batch must give the same real tokens, pooled output and kept indices.
The models are built from configs with random weights, q / k scaled so that the scores differ.
"""
import math

import pytest
import torch

import pruneattn
from model_reference import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")


def _scale_qk(model, factor=4.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(factor)
    return model


def _eager_alone(layers, x, rates, stat="var"):
    """One image's real tokens ``x`` (1, n, C) through CLIP-style pre-norm layers; the layers in
    ``rates`` keep ceil(rate * n) patches after their attention, scored by the statistic over heads
    of the attention each key receives averaged over all queries (no class token). Returns the
    tokens and {layer: kept indices into x's tokens}."""
    kept, grid = {}, None
    for i, layer in enumerate(layers):
        a = layer.self_attn
        h = layer.layer_norm1(x)
        B, N, _ = h.shape
        q, k, v = (proj(h).view(B, N, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        attn = torch.softmax(q @ k.transpose(-1, -2) * a.scale, dim=-1)
        x = x + a.out_proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
        if i in rates:
            received = attn.mean(dim=2)[0]  # (H, N)
            centred = received - received.mean(dim=0)
            score = (centred * centred).mean(dim=0) if stat == "var" else received.mean(dim=0)
            n_keep = max(1, math.ceil(round(rates[i] * N, 9)))
            best = sorted(range(N), key=lambda j: (-float(score[j]), j))[:n_keep]
            idx = sorted(best)
            x = x[:, idx]
            grid = idx if grid is None else [grid[j] for j in idx]
            kept[i] = list(grid)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, kept


# ----------------------------------------------------------------------------- SigLIP2 NaFlex


def _siglip2(dtype=torch.float64, layers=4):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    cfg = Siglip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=3,
                              patch_size=4, num_patches=64, attention_dropout=0.0)
    return _scale_qk(Siglip2VisionModel(cfg)).eval().to(dtype)


def _naflex_batch(shapes, N=64, patch=4, dtype=torch.float64):
    """What Siglip2's processor gives for images of these patch grids: pixel_values (B, N, 3 * p * p)
    padded with zeros, pixel_attention_mask (B, N) 1 at the real patches (first), spatial_shapes."""
    g = torch.Generator().manual_seed(1)
    B = len(shapes)
    pixel_values = torch.zeros(B, N, 3 * patch * patch, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.long)
    for b, (h, w) in enumerate(shapes):
        pixel_values[b, : h * w] = torch.randn(h * w, 3 * patch * patch, generator=g, dtype=torch.float64)
        mask[b, : h * w] = 1
    return pixel_values.to(dtype), mask, torch.tensor(shapes)


SHAPES = [(8, 8), (5, 7), (1, 1), (3, 3)]  # a full grid, odd counts, one patch


def test_siglip2_keep_one_equals_unpatched(cpu_backend):
    model = _siglip2()
    batch = _naflex_batch(SHAPES)
    with torch.no_grad():
        want = model(*batch)
        pruneattn.patch(model, keep_rate=1.0)
        got = model(*batch)
    real = batch[1].bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real])
    torch.testing.assert_close(got.pooler_output, want.pooler_output)


@pytest.mark.parametrize("rate, layers", [(0.7, [1, 2]), (0.5, [0, 3])])
def test_siglip2_pruned_equals_each_image_alone(rate, layers, cpu_backend):
    model = _siglip2()
    pixel_values, mask, shapes = _naflex_batch(SHAPES)
    with torch.no_grad():
        embeddings = model.embeddings(pixel_values, shapes)
        pruneattn.patch(model, keep_rate=rate, layers=layers)
        out = model(pixel_values, mask, shapes)
        kept = pruneattn.kept_indices(model)
        for b, (h, w) in enumerate(SHAPES):
            x, want_kept = _eager_alone(model.encoder.layers, embeddings[b : b + 1, : h * w],
                                        dict.fromkeys(layers, rate))
            x = model.post_layernorm(x)
            n = x.shape[1]
            torch.testing.assert_close(out.last_hidden_state[b, :n], x[0])
            assert torch.isfinite(out.last_hidden_state[b, n:]).all()  # padding: any finite values
            torch.testing.assert_close(out.pooler_output[b], model.head(x)[0])
            for layer in layers:
                row = kept[layer][b].tolist()
                assert row[: len(want_kept[layer])] == want_kept[layer]
                assert set(row[len(want_kept[layer]):]) <= {-1}


def test_siglip2_tokens_per_image_and_fuse(cpu_backend):
    model = _siglip2()
    batch = _naflex_batch(SHAPES)
    with torch.no_grad():
        pruneattn.patch(model, tokens=5, layers=[1])
        out = model(*batch)
        kept = pruneattn.kept_indices(model)[1]
        assert (kept >= 0).sum(1).tolist() == [5, 5, 1, 5] and out.last_hidden_state.shape[1] == 5
        pruneattn.patch(model, keep_rate=0.5, layers=[1, 2], mode="fuse")
        out = model(*batch)
    assert torch.isfinite(out.pooler_output).all()
    assert out.last_hidden_state.shape[1] == 16 + 1  # ceil(0.5 * ceil(0.5 * 64)) + the fused token


def test_siglip2_under_the_triton_interpreter(device):
    model = _siglip2(torch.float32)
    batch = _naflex_batch(SHAPES, dtype=torch.float32)
    reference = _siglip2(torch.float64)
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.7, layers=[1, 2])
        pruneattn.patch(reference, keep_rate=0.7, layers=[1, 2])
        with pruneattn.use_backend("triton"):
            got = model.to(device)(*(t.to(device) for t in batch))
        with pruneattn.use_backend("cpu"):
            want = reference(*_naflex_batch(SHAPES))
    assert torch.equal(pruneattn.kept_indices(model)[2].cpu(), pruneattn.kept_indices(reference)[2])
    torch.testing.assert_close(got.pooler_output.cpu().double(), want.pooler_output, rtol=1e-4, atol=1e-4)


def test_siglip2_compiles(cpu_backend):
    model = _siglip2(torch.float32, layers=2)
    batch = _naflex_batch(SHAPES, dtype=torch.float32)
    pruneattn.patch(model, keep_rate=0.7, layers=[1])
    with torch.no_grad():
        eager = model(*batch)
        compiled = torch.compile(model)(*batch)
    torch.testing.assert_close(compiled.pooler_output, eager.pooler_output, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state, rtol=1e-3, atol=1e-4)


def test_siglip2_model_image_features(cpu_backend):
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(0)
    cfg = Siglip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                           patch_size=4, num_patches=64),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16),
    )
    model = _scale_qk(Siglip2Model(cfg)).eval().double()
    pixel_values, mask, shapes = _naflex_batch(SHAPES)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        pruneattn.patch(model, keep_rate=1.0)
        same = model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        pruneattn.patch(model, keep_rate=0.5)
        pruned = model.get_image_features(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
    pool = lambda o: o.pooler_output if hasattr(o, "pooler_output") else o  # noqa: E731
    torch.testing.assert_close(pool(same), pool(want))
    assert pool(pruned).shape == pool(want).shape and not torch.allclose(pool(pruned), pool(want))


FULL = [[(8, 8), (8, 8), (8, 8)], [(8, 8)]]  # same-size images that fill max_num_patches: a mask of ones


@pytest.mark.parametrize("shapes", FULL, ids=["batch3", "batch1"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_siglip2_mask_of_ones(shapes, impl, cpu_backend):
    """Every patch real (transformers then passes the layers no mask at all): keep 1.0 equals unpatched,
    pruned equals each image alone, and the pooling head pools the kept tokens."""
    model = _siglip2()
    model.config._attn_implementation = impl
    pixel_values, mask, spatial = _naflex_batch(shapes)
    assert bool(mask.all())
    with torch.no_grad():
        want = model(pixel_values, mask, spatial)
        pruneattn.patch(model, keep_rate=1.0)
        same = model(pixel_values, mask, spatial)
        tol = 0 if impl == "sdpa" else 1e-5  # transformers' eager attention takes its softmax in float32
        torch.testing.assert_close(same.last_hidden_state, want.last_hidden_state, rtol=tol, atol=tol)
        torch.testing.assert_close(same.pooler_output, want.pooler_output, rtol=tol, atol=tol)
        embeddings = model.embeddings(pixel_values, spatial)
        for mode in ("drop", "fuse"):
            pruneattn.patch(model, keep_rate=0.5, layers=[1, 2], mode=mode)
            out = model(pixel_values, mask, spatial)
            kept = pruneattn.kept_indices(model)
            assert out.last_hidden_state.shape[1] == 16 + (mode == "fuse")
            assert (kept[2] >= 0).all()
            if mode == "fuse":
                assert torch.isfinite(out.pooler_output).all()
                continue
            for b in range(len(shapes)):
                x, want_kept = _eager_alone(model.encoder.layers, embeddings[b : b + 1], {1: 0.5, 2: 0.5})
                x = model.post_layernorm(x)
                close = {} if impl == "sdpa" else dict(rtol=1e-4, atol=1e-5)  # (its unpruned layers: float32)
                torch.testing.assert_close(out.last_hidden_state[b], x[0], **close)
                torch.testing.assert_close(out.pooler_output[b], model.head(x)[0], **close)
                assert kept[2][b].tolist() == want_kept[2]


def test_siglip2_classifier_is_refused():
    from transformers import Siglip2Config, Siglip2ForImageClassification

    cfg = Siglip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=4, num_patches=16),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(TypeError, match="Siglip2ForImageClassification: its classifier averages"):
        pruneattn.patch(Siglip2ForImageClassification(cfg))


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM towers


def _tower(kind, dtype=torch.float64, heads=6):
    if kind == "idefics3":
        from transformers import Idefics3VisionConfig as Config, Idefics3VisionTransformer as Tower
    else:
        from transformers import SmolVLMVisionConfig as Config, SmolVLMVisionTransformer as Tower
    torch.manual_seed(0)
    cfg = Config(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=heads, patch_size=4,
                 image_size=32, attention_dropout=0.0)
    return _scale_qk(Tower(cfg)).eval().to(dtype)


def _padded_images(regions, grid=8, patch=4, dtype=torch.float64):
    """Images padded to one size (zeros) and their (B, grid, grid) patch mask: the real patches are a
    top-left rectangle (rows, cols) of each image, so that flattened they are not a prefix."""
    g = torch.Generator().manual_seed(2)
    B = len(regions)
    images = torch.zeros(B, 3, grid * patch, grid * patch, dtype=torch.float64)
    mask = torch.zeros(B, grid, grid, dtype=torch.bool)
    for b, (r, c) in enumerate(regions):
        images[b, :, : r * patch, : c * patch] = torch.randn(3, r * patch, c * patch, generator=g, dtype=torch.float64)
        mask[b, :r, :c] = True
    return images.to(dtype), mask


REGIONS = [(8, 8), (3, 5), (1, 1), (7, 2)]


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_tower_pruned_equals_each_image_alone(kind, cpu_backend):
    model = _tower(kind)
    images, mask = _padded_images(REGIONS)
    with torch.no_grad():
        want = model(images, mask)
        embeddings = model.embeddings(pixel_values=images, patch_attention_mask=mask)
        pruneattn.patch(model, keep_rate=1.0)
        same = model(images, mask)
        real = mask.flatten(1)
        torch.testing.assert_close(same.last_hidden_state[real], want.last_hidden_state[real])
        layers = [1, 2]
        pruneattn.patch(model, keep_rate=0.7, layers=layers)
        out = model(images, mask)
        kept = pruneattn.kept_indices(model)
        for b in range(len(REGIONS)):
            positions = real[b].nonzero().squeeze(1).tolist()  # grid index of each real token
            x, want_kept = _eager_alone(model.encoder.layers, embeddings[b : b + 1, real[b]], dict.fromkeys(layers, 0.7))
            n = x.shape[1]
            torch.testing.assert_close(out.last_hidden_state[b, :n], model.post_layernorm(x)[0])
            for layer in layers:
                row = kept[layer][b].tolist()
                assert row[: len(want_kept[layer])] == [positions[j] for j in want_kept[layer]]
                assert set(row[len(want_kept[layer]):]) <= {-1}


def test_tower_without_mask_prunes_every_image_alike(cpu_backend):
    model = _tower("idefics3")
    images, _ = _padded_images([(8, 8), (8, 8)])
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.5, layers=[1])
        out = model(images)
    assert out.last_hidden_state.shape == (2, 32, 48)
    assert (pruneattn.kept_indices(model)[1] >= 0).all()


# ----------------------------------------------------------------------------- Pixtral (images packed in one sequence)


def _pixtral(dtype=torch.float64):
    from transformers import PixtralVisionConfig, PixtralVisionModel

    torch.manual_seed(0)
    cfg = PixtralVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                              patch_size=4, image_size=32, head_dim=16, attention_dropout=0.0)
    return _scale_qk(PixtralVisionModel(cfg)).eval().to(dtype)


PIXTRAL_SIZES = [(32, 32), (20, 28), (4, 4), (8, 12)]  # pixels: 8 x 8, 5 x 7, 1 x 1 and 2 x 3 patches


def _pixtral_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(len(PIXTRAL_SIZES), 3, 32, 32, generator=g, dtype=torch.float64).to(dtype)
    return pixels, torch.tensor(PIXTRAL_SIZES)


def _rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _pixtral_alone(model, image, size, rates):
    """One image through Pixtral in pieces: its own patches, its 2-D rotary tables indexed by the kept
    patches' grid positions, plain softmax attention, the spec's score (query mean, variance)."""
    p = model.patch_size
    h, w = size[0] // p, size[1] // p
    x = model.ln_pre(model.patch_conv(image[None])[0, :, :h, :w].flatten(1).T[None])
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cos, sin = model.patch_positional_embedding(x, torch.stack([rows.flatten(), cols.flatten()], dim=-1))
    grid, kept = list(range(h * w)), {}
    for i, layer in enumerate(model.transformer.layers):
        a = layer.attention
        hn = layer.attention_norm(x)
        N = hn.shape[1]
        q, k, v = (proj(hn).view(1, N, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        c, s = cos[grid], sin[grid]
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        attn = torch.softmax(q @ k.transpose(-1, -2) * a.scaling, dim=-1)
        x = x + a.o_proj((attn @ v).transpose(1, 2).reshape(1, N, -1))
        if i in rates:
            received = attn.mean(dim=2)[0]
            centred = received - received.mean(dim=0)
            score = (centred * centred).mean(dim=0)
            n_keep = max(1, math.ceil(round(rates[i] * N, 9)))
            idx = sorted(sorted(range(N), key=lambda j: (-float(score[j]), j))[:n_keep])
            x, grid = x[:, idx], [grid[j] for j in idx]
            kept[i] = list(grid)
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return x[0], kept


def test_pixtral_keep_one_equals_unpatched(cpu_backend):
    model = _pixtral()
    pixels, sizes = _pixtral_inputs()
    with torch.no_grad():
        want = model(pixels, image_sizes=sizes).last_hidden_state
        pruneattn.patch(model, keep_rate=1.0, layers=[1, 2])
        got = model(pixels, image_sizes=sizes).last_hidden_state
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layers", [[1, 2], [0, 3]])
def test_pixtral_pruned_equals_each_image_alone(layers, cpu_backend):
    model = _pixtral()
    pixels, sizes = _pixtral_inputs()
    rates = dict.fromkeys(layers, 0.6)
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.6, layers=layers)
        packed = model(pixels, image_sizes=sizes).last_hidden_state[0]
        kept = pruneattn.kept_indices(model)
        start = 0
        for b, size in enumerate(PIXTRAL_SIZES):
            x, want_kept = _pixtral_alone(model, pixels[b], size, rates)
            # Pixtral's RMSNorm computes in float32 even in a float64 model: float32 rounding, not float64
            torch.testing.assert_close(packed[start : start + x.shape[0]], x, rtol=1e-5, atol=1e-6)
            start += x.shape[0]
            for layer in layers:
                row = kept[layer][b].tolist()
                assert row[: len(want_kept[layer])] == want_kept[layer]
                assert set(row[len(want_kept[layer]):]) <= {-1}
        assert start == packed.shape[0]  # the packed output holds exactly the kept tokens


def test_pixtral_under_the_triton_interpreter(device):
    model, reference = _pixtral(torch.float32), _pixtral(torch.float64)
    with torch.no_grad():
        for m in (model, reference):
            pruneattn.patch(m, keep_rate=0.6, layers=[1, 2])
        pixels, sizes = _pixtral_inputs(torch.float32)
        with pruneattn.use_backend("triton"):
            got = model.to(device)(pixels.to(device), image_sizes=sizes).last_hidden_state
        with pruneattn.use_backend("cpu"):
            want = reference(*_pixtral_inputs()[:1], image_sizes=sizes).last_hidden_state
    assert torch.equal(pruneattn.kept_indices(model)[2].cpu(), pruneattn.kept_indices(reference)[2])
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_pixtral_fuse_is_refused():
    with pytest.raises(ValueError, match="packed in one sequence"):
        pruneattn.patch(_pixtral(), keep_rate=0.5, mode="fuse")


def test_idefics3_tower_under_the_triton_interpreter(device):
    model, reference = _tower("idefics3", torch.float32, heads=3), _tower("idefics3", torch.float64, heads=3)
    images, mask = _padded_images(REGIONS)
    with torch.no_grad():
        for m in (model, reference):
            pruneattn.patch(m, keep_rate=0.7, layers=[1, 2])
        with pruneattn.use_backend("triton"):
            got = model.to(device)(images.float().to(device), mask.to(device)).last_hidden_state
        with pruneattn.use_backend("cpu"):
            want = reference(images, mask).last_hidden_state
    assert torch.equal(pruneattn.kept_indices(model)[2].cpu(), pruneattn.kept_indices(reference)[2])
    real = pruneattn.kept_indices(reference)[2] >= 0
    torch.testing.assert_close(got.cpu().double()[real], want[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["idefics3", "pixtral"])
def test_padded_and_packed_towers_compile(kind, cpu_backend):
    if kind == "pixtral":
        model = _pixtral(torch.float32)
        pixels, sizes = _pixtral_inputs(torch.float32)
        run = lambda m: m(pixels, image_sizes=sizes).last_hidden_state  # noqa: E731
    else:
        model = _tower("idefics3", torch.float32)
        images, mask = _padded_images(REGIONS, dtype=torch.float32)
        run = lambda m: m(images, mask).last_hidden_state  # noqa: E731
    pruneattn.patch(model, keep_rate=0.7, layers=[1])
    with torch.no_grad():
        eager = run(model)
        compiled = run(torch.compile(model))
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_pixtral_transformer_alone_is_refused(cpu_backend):
    model = _pixtral()
    pruneattn.patch(model, keep_rate=0.5, layers=[1])
    x = torch.randn(1, 10, 48, dtype=torch.float64)
    with pytest.raises(TypeError, match="call the vision model itself"):
        model.transformer(x, None, position_embeddings=(torch.ones(10, 16), torch.zeros(10, 16)))


def test_unpatch_restores_padded_and_packed_models(cpu_backend):
    from pruneattn.patch.swap import is_swapped

    for model, run in ((_siglip2(), lambda m: m(*_naflex_batch(SHAPES)).pooler_output),
                       (_pixtral(), lambda m: m(_pixtral_inputs()[0], image_sizes=_pixtral_inputs()[1]).last_hidden_state)):
        with torch.no_grad():
            want = run(model)
            pruneattn.patch(model, keep_rate=0.5, layers=[1])
            assert run(model).shape != want.shape or not torch.equal(run(model), want)
            pruneattn.unpatch(model)
            assert not any(is_swapped(m) or m._forward_pre_hooks or m._forward_hooks for m in model.modules())
            torch.testing.assert_close(run(model), want)
