"""Fashion-MNIST loader (idx reader, canvas view), training steps, and the shipped model on a slice of real data.

Uses the Debian package's files when present (``apt-get install -y dataset-fashion-mnist``), else the
sample of test images shipped in ``pruneattn/fashion_mnist/data/``.
"""
import struct

import numpy as np
import pytest
import torch

import pruneattn
from helpers import write_idx
from pruneattn.fashion_mnist import datasets
from pruneattn.fashion_mnist.train import DEFAULT_CONFIG, DEFAULT_WEIGHTS, build_model, evaluate, load_model, save_checkpoint, train

HAVE_DATA = datasets.available()


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared CPU: one torch thread avoids oversubscription stalls (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def slice_of_data():
    """(images, labels) of a slice of the test set: the real files if installed, else the shipped sample."""
    if HAVE_DATA:
        images, labels = datasets.load_fashion_mnist("test")
        return images[:256], labels[:256]
    return datasets.load_sample()


# ----------------------------------------------------------------------------- idx reader


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    ints = rng.integers(-(2**30), 2**30, size=(7,), dtype=np.int32)
    write_idx(tmp_path / "img.gz", images, 0x08, compress)
    write_idx(tmp_path / "ints.gz", ints, 0x0C, compress)
    got = datasets.read_idx(tmp_path / "img.gz")
    assert got.shape == (5, 3, 4) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    got = datasets.read_idx(tmp_path / "ints.gz")
    assert got.dtype.byteorder in ("=", "<", "|") or got.dtype.isnative
    np.testing.assert_array_equal(got, ints)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an idx file"):
        datasets.read_idx(tmp_path / "bad")
    # header says 3 items, 2 present
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + b"ab")
    with pytest.raises(ValueError, match="does not match"):
        datasets.read_idx(tmp_path / "short")


def test_load_split_from_folder(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, size=(6,), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, 0x08, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs, 0x08, True)
    got_i, got_l = datasets.load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(got_i, imgs)
    np.testing.assert_array_equal(got_l, labs)
    assert got_l.dtype == np.int64
    with pytest.raises(datasets.DatasetMissing, match="apt-get install -y dataset-fashion-mnist"):
        datasets.load_fashion_mnist("train", root=tmp_path)


def test_missing_files_say_how_to_install(tmp_path):
    assert not datasets.available(tmp_path)
    with pytest.raises(datasets.DatasetMissing, match="apt-get install -y dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.load_fashion_mnist("valid", root=tmp_path)


@pytest.mark.skipif(not HAVE_DATA, reason="dataset-fashion-mnist not installed")
def test_real_files_and_shipped_sample():
    tr_i, tr_l = datasets.load_fashion_mnist("train")
    te_i, te_l = datasets.load_fashion_mnist("test")
    assert tr_i.shape == (60000, 28, 28) and te_i.shape == (10000, 28, 28)
    assert np.bincount(tr_l).tolist() == [6000] * 10 and np.bincount(te_l).tolist() == [1000] * 10
    s_i, s_l = datasets.load_sample()
    np.testing.assert_array_equal(s_i, te_i[: len(s_i)])
    np.testing.assert_array_equal(s_l, te_l[: len(s_l)])


# ----------------------------------------------------------------------------- canvas view


def test_canvas_view_places_the_whole_image_deterministically():
    images, _ = datasets.load_sample()
    idx = np.arange(len(images))
    view = datasets.make_view(images, idx, view="canvas", canvas=56, seed=0)
    assert view.shape == (len(images), 56, 56) and view.dtype == torch.uint8
    offs = datasets.canvas_offsets(idx, 56, 28, 0)
    assert offs.min() >= 0 and offs.max() <= 28
    for i in range(len(images)):
        r, c = offs[i]
        np.testing.assert_array_equal(view[i, r : r + 28, c : c + 28].numpy(), images[i])
        assert int(view[i].sum()) == int(images[i].astype(np.int64).sum())  # nothing outside the image
    # Per index: a slice gets the same positions as the whole; another seed moves the images.
    np.testing.assert_array_equal(datasets.canvas_offsets(idx[10:20], 56, 28, 0), offs[10:20])
    assert (datasets.canvas_offsets(idx, 56, 28, 1) != offs).any(axis=1).mean() > 0.8
    # Positions are spread over the canvas, not stuck in a corner.
    assert len(set(map(tuple, offs))) > 50 and offs[:, 0].std() > 4 and offs[:, 1].std() > 4
    plain = datasets.make_view(images, idx, view="plain")
    np.testing.assert_array_equal(plain.numpy(), images)
    x = datasets.normalize(view[:2])
    assert x.shape == (2, 1, 56, 56) and x.dtype == torch.float32


# ----------------------------------------------------------------------------- training and evaluation


def test_a_few_training_steps_reduce_the_loss():
    images, labels = slice_of_data()
    images, labels = images[:64], labels[:64]
    cfg = dict(DEFAULT_CONFIG, embed_dim=32, num_heads=1, depth=4, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    x = datasets.normalize(datasets.make_view(images, np.arange(64), canvas=56, seed=0))
    y = torch.as_tensor(labels)
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
    p0 = [p.detach().clone() for p in model.parameters()]
    info = train(model, images, labels, config=cfg, epochs=12, batch_size=32, lr=3e-3, warmup=2, flip=False,
                 label_smoothing=0.0, progress=False)
    assert info["steps"] == 24
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(p0, model.parameters()))
    assert after < before - 0.2, (before, after)


def test_training_with_pruning_on_runs_and_learns():
    images, labels = slice_of_data()
    images, labels = images[:32], labels[:32]
    cfg = dict(DEFAULT_CONFIG, embed_dim=32, num_heads=1, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = pruneattn.patch(build_model(cfg), keep_rate=0.5, layers=(3, 6, 9), stat="var")
    with pruneattn.use_backend("cpu"):
        info = train(model, images, labels, config=cfg, epochs=2, batch_size=16, lr=1e-3, warmup=1,
                     progress=False)
        assert info["steps"] == 4 and np.isfinite(info["last_loss"])
        kept = pruneattn.kept_indices(model)
    assert {b: tuple(v.shape) for b, v in kept.items()} == {3: (16, 32), 6: (16, 16), 9: (16, 8)}


def test_checkpoint_roundtrip_is_float16(tmp_path):
    cfg = dict(DEFAULT_CONFIG, embed_dim=32, num_heads=1, depth=2)
    model = build_model(cfg)
    save_checkpoint(model, cfg, tmp_path / "m.pt", meta={"note": "x"})
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    loaded, ck = load_model(tmp_path / "m.pt")
    assert ck["config"]["depth"] == 2 and ck["meta"]["note"] == "x"
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(b, a.half().float(), msg=n)


def test_shipped_weights_are_small_and_complete():
    assert DEFAULT_WEIGHTS.is_file(), "the trained model must ship inside the package"
    assert DEFAULT_WEIGHTS.stat().st_size <= 8 * 1024 * 1024
    model, ckpt = load_model()
    assert ckpt["config"]["depth"] == 12 and len(model.blocks) == 12
    assert ckpt["config"]["embed_dim"] // ckpt["config"]["num_heads"] in (32, 64)  # what the kernels support
    from pruneattn.fashion_mnist.demo import training_command

    assert training_command(ckpt["meta"]).startswith("python -m pruneattn.fashion_mnist.train ")


def test_shipped_model_on_a_slice_of_real_data():
    """Small evaluation: the shipped model is far above chance (10%), and pruning at keep 0.7 stays close."""
    images, labels = slice_of_data()
    model, ckpt = load_model()
    cfg = ckpt["config"]
    base = evaluate(model, images, labels, config=cfg)
    assert base["top1"] > 0.6, base
    with pruneattn.use_backend("cpu"):
        for stat in ("var", "mad"):
            pruneattn.patch(model, keep_rate=0.7, layers=(3, 6, 9), stat=stat)
            pruned = evaluate(model, images, labels, config=cfg)
            assert pruned["top1"] > base["top1"] - 0.15, (stat, base, pruned)
            pruneattn.unpatch(model)


def test_training_command_builds_the_asked_head_count(tmp_path, monkeypatch):
    """``--embed-dim`` / ``--heads`` reach the model and its checkpoint; a head count that does not divide
    the width is refused before any data is read."""
    from pruneattn.fashion_mnist import train as train_cli

    images, labels = datasets.load_sample()
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images, 0x08, True)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8), 0x08, True)
    monkeypatch.setenv("PRUNEATTN_FASHION_MNIST", str(tmp_path))
    out = tmp_path / "h6.pt"
    argv = ["--epochs", "0.25", "--batch-size", "16", "--warmup", "1", "--embed-dim", "48", "--heads", "6",
            "--threads", "1", "--out", str(out)]
    assert train_cli.main(argv) == 0
    model, ckpt = load_model(out)
    assert ckpt["config"]["num_heads"] == 6 and ckpt["config"]["embed_dim"] == 48
    assert model.blocks[0].attn.num_heads == 6 and model.blocks[0].attn.head_dim == 8
    assert ckpt["meta"]["steps"] == 1
    with pytest.raises(SystemExit):
        train_cli.main(["--heads", "5", "--out", str(tmp_path / "bad.pt")])
    assert not (tmp_path / "bad.pt").exists()


def test_training_by_default_does_not_overwrite_the_shipped_model(capsys):
    from pruneattn.fashion_mnist import train as train_cli

    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = capsys.readouterr().out
    assert "default: vit_fmnist.pt" in text and str(DEFAULT_WEIGHTS) not in text
