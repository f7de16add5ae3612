"""One pruning state per forward call: threads, nested forwards, checkpoint recomputes, several patched
models, export, tracing and the other ways a model is used besides a plain call."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModel, DeiTConfig, DeiTForImageClassification

import pruneattn
from pruneattn.patch.swap import Swapped
from model_reference import one_thread  # noqa: F401 (autouse fixture)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=4)


def vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**(TINY | kw)).eval()


def eva() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_rope_224", pretrained=False, **TINY).eval()


def deit(attn: str = "sdpa") -> DeiTForImageClassification:
    torch.manual_seed(0)
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, num_labels=4, attn_implementation=attn)
    return DeiTForImageClassification(config).eval()


def clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4,
                              num_attention_heads=2, intermediate_size=128)
    return CLIPVisionModel(config).eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out.pooler_output


MODELS = {"vit": vit, "eva": eva, "deit": deit, "clip": clip}


# ----------------------------------------------------------------------------- threads


def in_two_threads(call, inputs: list[torch.Tensor], reps: int = 3) -> dict[tuple[int, int], object]:
    """``call(inputs[i])`` for every input ``reps`` times, the inputs split between two threads that start
    together; returns {(input, rep): result} and re-raises what a thread raised."""
    seen, errors = {}, []
    barrier = threading.Barrier(2)

    def work(part: int) -> None:
        try:
            barrier.wait()
            with pruneattn.use_backend("cpu"), torch.no_grad():
                for rep in range(reps):
                    for i in range(part, len(inputs), 2):
                        seen[(i, rep)] = call(inputs[i])
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_threads_share_one_patched_model(cpu_backend, name):
    """Each thread's outputs are those of a call alone (batch sizes differ per thread)."""
    model = pruneattn.patch(MODELS[name](), keep_rate=0.5, layers=(1, 2), mode="fuse")
    inputs = [images(1 + i % 3, seed=i) for i in range(8)]
    with torch.no_grad():
        alone = [logits(model, x) for x in inputs]
    for (i, _), out in in_two_threads(lambda x: logits(model, x), inputs).items():
        torch.testing.assert_close(out, alone[i], rtol=0, atol=0)
    kept = pruneattn.kept_indices(model)  # the last call to finish: one whole call's indices
    assert kept.keys() == {1, 2} and kept[1].shape[0] == kept[2].shape[0]


def test_two_threads_forward_intermediates_grids(cpu_backend):
    model = pruneattn.patch(eva(), keep_rate=0.5, layers=(1, 2))
    inputs = [images(1 + i % 2, seed=10 + i) for i in range(6)]

    def grids(x):
        return model.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)

    with torch.no_grad():
        alone = [grids(x) for x in inputs]
    for (i, _), got in in_two_threads(grids, inputs).items():
        for g, want in zip(got, alone[i]):
            torch.testing.assert_close(g, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- nested forwards


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_forward_inside_a_hook_of_another_forward(cpu_backend, name):
    model = pruneattn.patch(MODELS[name](), keep_rate=0.5, layers=(1, 2))
    outer, inner = images(2, seed=1), images(3, seed=2)
    with torch.no_grad():
        want_inner = logits(model, inner)
        want = logits(model, outer)
        want_kept = pruneattn.kept_indices(model)
        blocks = model.blocks if name == "vit" else model.deit.layers
        got_inner = []

        def hook(*_):
            if not got_inner:  # once: the inner call runs this hook too
                got_inner.append(None)
                got_inner[0] = logits(model, inner)

        handle = blocks[1].register_forward_hook(hook)
        try:
            got = logits(model, outer)
        finally:
            handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_inner[0], want_inner, rtol=0, atol=0)
    kept = pruneattn.kept_indices(model)  # the outer call finished last
    assert all(torch.equal(kept[i], want_kept[i]) for i in (1, 2))


# ----------------------------------------------------------------------------- activation checkpointing


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["vit", "deit"])
def test_two_forwards_then_backward_with_checkpointing(cpu_backend, monkeypatch, name, reentrant):
    """Forward A, forward B, then A's backward (its recompute): indices stay B's, A's gradients are right."""
    import timm.layers.config

    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", reentrant)
    model = pruneattn.patch(MODELS[name]().train(), keep_rate=0.5, layers=(1, 2), mode="fuse")
    a, b = images(2, seed=3), images(3, seed=4)
    ya, yb = torch.tensor([0, 1]), torch.tensor([2, 3, 0])
    F.cross_entropy(logits(model, a), ya).backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    logits(model, b)
    kept_b = pruneattn.kept_indices(model)
    if name == "vit":
        model.set_grad_checkpointing(True)
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    loss_a = F.cross_entropy(logits(model, a), ya)
    logits(model, b)  # the latest forward
    loss_a.backward()  # recomputes A's blocks
    kept = pruneattn.kept_indices(model)
    assert all(torch.equal(kept[i], kept_b[i]) for i in (1, 2)) and kept[1].shape[0] == 3
    got = _grads(model)
    assert got.keys() == plain.keys()
    for n in plain:
        torch.testing.assert_close(got[n], plain[n], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- several patched models


class StudentTeacher(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = vit(), vit(depth=6)

    def forward(self, x):
        return self.student(x), self.teacher(x)


def test_kept_indices_of_a_parent_with_two_patched_models(cpu_backend):
    pair = StudentTeacher()
    pruneattn.patch(pair.student, keep_rate=0.5, layers=(1,))
    pruneattn.patch(pair.teacher, keep_rate=0.7, layers=(2, 4))
    with torch.no_grad():
        pair(images(2, seed=5))
    with pytest.raises(ValueError, match=r"2 patched models \(student, teacher\)"):
        pruneattn.kept_indices(pair)
    assert pruneattn.kept_indices(pair.student).keys() == {1}
    assert pruneattn.kept_indices(pair.teacher).keys() == {2, 4}


def test_unpatch_parent_restores_every_class():
    pair = StudentTeacher()
    classes = {n: type(m) for n, m in pair.named_modules()}
    pruneattn.patch(pair.student, keep_rate=0.5, layers=(1,))
    pruneattn.patch(pair.teacher, keep_rate=0.7, layers=(2, 4))
    assert type(pair.student) is not VisionTransformer
    pruneattn.unpatch(pair)
    assert {n: type(m) for n, m in pair.named_modules()} == classes
    assert not any(k.startswith("_pruneattn") for m in pair.modules() for k in vars(m))


def test_unpatch_removes_hugging_face_hooks(cpu_backend):
    model = deit()
    x = images(2, seed=6)
    with torch.no_grad():
        ref = logits(model, x)
        pruneattn.patch(model, keep_rate=0.5, layers=(1,))
        pruneattn.unpatch(model)
        torch.testing.assert_close(logits(model, x), ref, rtol=0, atol=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------- export, tracing, torch.func


def test_kept_indices_after_export_is_a_clear_error(cpu_backend):
    model = pruneattn.patch(vit(), keep_rate=0.5, layers=(1, 2))
    x = images(2, seed=7)
    exported = torch.export.export(model, (x,))
    with pytest.raises(RuntimeError, match="torch.export"):
        pruneattn.kept_indices(model)
    torch.testing.assert_close(exported.module()(x), model(x))  # the eager call records again
    assert all(not isinstance(t, torch._subclasses.FakeTensor) for t in pruneattn.kept_indices(model).values())
    assert pruneattn.kept_indices(model)[2].shape == (2, 4)


def test_jit_script_refuses_with_the_ways_that_work():
    model = pruneattn.patch(vit(), keep_rate=0.5, layers=(1,))
    with pytest.raises(TypeError, match="torch.jit.trace, torch.compile or torch.export"):
        torch.jit.script(model)


def test_fx_tracing_refuses_with_a_reason():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = pruneattn.patch(vit(), keep_rate=0.5, layers=(1,))
    with pytest.raises(TypeError, match="torch.fx symbolic tracing"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(TypeError, match="torch.fx symbolic tracing"):
        create_feature_extractor(model, ["blocks.3"])


def test_functional_call_and_func_grad(cpu_backend):
    from torch.func import functional_call, grad

    model = pruneattn.patch(vit(), keep_rate=0.5, layers=(1,))
    x = images(2, seed=8)
    params = {n: p.detach() * 1.5 for n, p in model.named_parameters()}
    out = functional_call(model, params, (x,))
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(params[n])
        want = model(x)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="torch.func"):
        grad(lambda p: functional_call(model, p, (x,)).sum())(params)


# ----------------------------------------------------------------------------- shapes and modes


@pytest.mark.parametrize("name", ["vit", "eva"])
def test_empty_batch_returns_what_the_unpatched_model_returns(cpu_backend, name):
    model = MODELS[name]()
    x = images(2, seed=9)[:0]
    with torch.no_grad():
        want = model(x)
        pruneattn.patch(model, keep_rate=0.5, layers=(1, 2), mode="fuse")
        got = model(x)
    assert got.shape == want.shape == (0, 4)
    assert pruneattn.kept_indices(model)[2].shape == (0, 4)


@pytest.mark.parametrize("name", ["vit", "eva"])
def test_patch_dropout_kept_indices_index_the_original_grid(cpu_backend, name):
    """Train mode with patch dropout: which grid patch each token is, is read independently from the
    embedding (every grid position's token is distinct), and keep 1.0 must report exactly those."""
    kw = dict(patch_drop_rate=0.5)
    model = vit(**kw) if name == "vit" else timm.create_model("vit_small_patch16_rope_224", pretrained=False,
                                                              **TINY, **kw)
    model.train()
    for m in model.modules():  # no randomness but the patch dropout's
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = images(2, seed=11)
    npt = model.num_prefix_tokens
    with torch.no_grad():
        model.eval()
        full = model.patch_embed(x)
        full = (model._pos_embed(full)[0] if name == "eva" else model._pos_embed(full))[:, npt:]
        model.train()
        pruneattn.patch(model, keep_rate=1.0, layers=(0,))
        entering = []
        handle = model.blocks[0].register_forward_pre_hook(lambda m, a: entering.append(a[0][:, npt:]))
        torch.manual_seed(3)
        model(x)
        handle.remove()
    tokens = entering[0]  # (B, L, C), L < 16 patches
    dist = (tokens[:, :, None] - full[:, None]).abs().sum(-1)  # (B, L, 16)
    grid = dist.argmin(-1)
    assert tokens.shape[1] < full.shape[1] and bool((dist.amin(-1) < 1e-5).all())
    assert torch.equal(pruneattn.kept_indices(model)[0], grid)
    pruneattn.patch(model, keep_rate=0.5, layers=(1,))
    with torch.no_grad():
        model(x)
    kept = pruneattn.kept_indices(model)[1]
    assert kept.shape == (2, 4) and int(kept.max()) < 16


def test_output_attentions_keeps_one_entry_per_layer(cpu_backend):
    model = deit("eager")  # the attention implementation that returns weights
    with torch.no_grad():
        n = len(model(images(2, seed=12), output_attentions=True).attentions)
        pruneattn.patch(model, keep_rate=0.5, layers=(1, 2))
        att = model(images(2, seed=12), output_attentions=True).attentions
    assert len(att) == n == 4
    assert att[1] is None and att[2] is None
    assert att[0].shape == (2, 2, 18, 18) and att[3].shape == (2, 2, 2 + 4, 2 + 4)


class MyViT(VisionTransformer):
    """A user's subclass, defined at module level so that a fresh process can import it."""


def test_torch_save_of_a_patched_user_subclass_loads_in_a_fresh_process(tmp_path, cpu_backend):
    torch.manual_seed(0)
    model = MyViT(**TINY).eval()
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 2), mode="fuse")
    x = images(2, seed=13)
    with torch.no_grad():
        want = model(x)
    torch.save({"model": model, "x": x, "want": want}, tmp_path / "model.pt")
    script = textwrap.dedent(f"""
        import sys, torch, pruneattn
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        d = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        m = d["model"]
        assert type(m).__name__ == "PrunedMyViT", type(m)
        with pruneattn.use_backend("cpu"), torch.no_grad():
            torch.testing.assert_close(m(d["x"]), d["want"], rtol=0, atol=0)
        assert pruneattn.kept_indices(m)[2].shape == (2, 4)
        pruneattn.unpatch(m)
        assert type(m).__name__ == "MyViT"
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# ----------------------------------------------------------------------------- torch.compile


def test_compile_dynamic_fullgraph_and_repatching_a_compiled_model(cpu_backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = pruneattn.patch(vit(), keep_rate=0.5, layers=(1, 2))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    try:
        with torch.no_grad():
            for n, rate in ((2, 0.5), (3, 0.5), (2, 0.25)):
                if rate != 0.5:
                    pruneattn.patch(model, keep_rate=rate, layers=(1, 2))
                x = images(n, seed=n)
                got = compiled(x)
                kept = pruneattn.kept_indices(model)
                torch.testing.assert_close(got, model(x))
                assert kept[2].shape == pruneattn.kept_indices(model)[2].shape
                assert all(torch.equal(kept[i], pruneattn.kept_indices(model)[i]) for i in kept)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count <= 2  # one graph per patch settings, none per block or batch size


def test_overlap_patches_then_set_input_size(cpu_backend):
    """The overlapping embedding's grid follows a new input size (stride and padding, not the kernel)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=4).eval()
    pruneattn.overlap_patches(model, stride=12, padding=2)
    model.set_input_size(img_size=(96, 96))
    grid = (96 + 2 * 2 - 16) // 12 + 1
    assert model.patch_embed.grid_size == (grid, grid) and model.pos_embed.shape[1] == 1 + grid * grid
    pruneattn.patch(model, keep_rate=0.5, layers=(1,))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 4)
    assert pruneattn.kept_indices(model)[1].shape == (1, grid * grid // 2)
    with pytest.raises(ValueError, match="patch size"):
        model.set_input_size(patch_size=8)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("12", TypeError),
                                        (True, TypeError)])
def test_default_layers_checks_its_argument(bad, error):
    with pytest.raises(error, match="depth"):
        pruneattn.default_layers(bad)
    assert pruneattn.default_layers(12) == (3, 6, 9)


def test_repatching_a_patched_hugging_face_model(cpu_backend):
    """Patching again checks the already swapped layers by their original class."""
    model = pruneattn.patch(deit(), keep_rate=0.5, layers=(1, 2))
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 3))
    with torch.no_grad():
        logits(model, images(2, seed=14))
    assert sorted(pruneattn.kept_indices(model)) == [1, 3]
    # the old hooks are gone: one pre-hook on the encoder, none twice; each layer swapped from its original class
    assert [len(m._forward_pre_hooks) for m in model.modules() if m._forward_pre_hooks] == [1]
    swapped = [m for m in model.modules() if isinstance(m, Swapped)]
    assert len(swapped) == 4 and not any(issubclass(type(m).__bases__[-1], Swapped) for m in swapped)
