"""``pruneattn demo`` end to end on the shipped model and sample (quick mode), and its picture."""
import re
from pathlib import Path

import numpy as np
import pytest

import pruneattn
from pruneattn import cli
from pruneattn.fashion_mnist import datasets, demo


@pytest.fixture
def fast_backend():
    # One torch thread (a shared CPU stalls with more). Under the test suite's TRITON_INTERPRET=1 the pruning blocks would run in Triton's (slow) interpreter;
    # the demo's job here is the pipeline, so use the fast CPU path (the kernels have their own tests).
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pruneattn.use_backend("cpu"):
        yield
    torch.set_num_threads(n)


def test_demo_quick_end_to_end(tmp_path, capsys, fast_backend):
    out = tmp_path / "demo.png"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # one row per configuration, with accuracy and speed
    rows = {name: re.search(rf"^{re.escape(name)}\s+([\d.]+)%\s+(\d+) \(", text, re.M)
            for name in ("unpruned", "var keep 0.7", "mad keep 0.7")}
    assert all(rows.values()), text
    accs = {k: float(m.group(1)) for k, m in rows.items()}
    assert accs["unpruned"] > 60, text  # the shipped model on the shipped sample, chance is 10%
    assert min(accs["var keep 0.7"], accs["mad keep 0.7"]) > accs["unpruned"] - 20, text
    assert "46/33/24" in text  # tokens after blocks 3/6/9 at keep 0.7 of 64 patches (+ class token)
    assert "(class token + patches)" in text and f"wrote {out.resolve()}" in text
    assert "--log" not in text and "pruneattn.fashion_mnist.train" in text
    assert f"--out {demo.TRAIN_OUT}" in text and f"pruneattn demo --weights {demo.TRAIN_OUT}" in text
    assert out.is_file() and out.stat().st_size > 20_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_via_cli_and_picture_content(tmp_path, monkeypatch, capsys, fast_backend):
    monkeypatch.setenv("PRUNEATTN_FASHION_MNIST", str(tmp_path / "nowhere"))  # no full test set
    out = tmp_path / "d.png"
    assert cli.main(["demo", "--full", "auto", "--stats", "mad", "--keep", "0.5", "--images", "2",
                     "--timing-seconds", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "apt-get install -y dataset-fashion-mnist" in text
    assert "mad keep 0.5" in text and "var keep" not in text and "33/17/9" in text
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.1  # not a blank canvas
    near = np.abs(img[..., :3] - np.asarray(demo.DROPPED_COLOR)).max(-1) < 0.05
    hatch = np.abs(img[..., :3] - np.asarray(demo.HATCH_COLOR)).max(-1) < 0.2
    assert near.mean() > 0.05 and hatch.mean() > 0.005  # dropped patches are drawn, hatched
    with pytest.raises(datasets.DatasetMissing):
        demo.main(["--full", "yes", "--out", str(tmp_path / "e.png")])


def test_kept_masks_match_kept_indices(fast_backend):
    import torch

    from pruneattn.fashion_mnist.train import load_model

    model, ckpt = load_model()
    imgs, _ = datasets.load_sample()
    x = datasets.normalize(datasets.make_view(imgs[:3], np.arange(3), canvas=56, seed=0))
    pruneattn.patch(model, keep_rate=0.7, layers=(3, 6, 9), stat="var")
    masks = demo.kept_masks(model, x, grid=8)
    idx = pruneattn.kept_indices(model)
    for b in (3, 6, 9):
        assert masks[b].shape == (3, 8, 8)
        assert masks[b].reshape(3, -1).sum(1).tolist() == [idx[b].shape[1]] * 3
        assert torch.equal(torch.nonzero(torch.from_numpy(masks[b][1].reshape(-1)))[:, 0], idx[b][1].cpu())
    # each later block keeps a subset of the earlier one
    assert not (masks[6] & ~masks[3]).any() and not (masks[9] & ~masks[6]).any()


def test_demo_writes_outside_the_working_directory_by_default(capsys):
    import tempfile
    from pathlib import Path

    assert demo.DEFAULT_OUT.parent == Path(tempfile.gettempdir()) / "pruneattn_demo"
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    assert str(demo.DEFAULT_OUT) in " ".join(capsys.readouterr().out.split())


def test_training_command_names_the_module_and_no_log_file(tmp_path):
    meta = {"command": "python -m pruneattn.train --epochs 2 --log /tmp/runs/train.log --out pruneattn/data/x.pt --log=/y"}
    out = tmp_path / "mine.pt"
    assert demo.training_command(meta, out) == f"python -m pruneattn.fashion_mnist.train --epochs 2 --out {out}"
    assert demo.training_command({}) == "?"


def test_training_command_never_writes_over_the_shipped_model():
    """The shipped model's own command wrote to the shipped file, and the training's default is that file:
    the printed command names another one, with or without an --out of its own."""
    from pruneattn.fashion_mnist.train import DEFAULT_WEIGHTS, load_model

    _, ckpt = load_model()
    shipped = str(ckpt["meta"]["command"])
    assert "--out" in shipped  # what the check below rewrites
    for command in (shipped, "python -m pruneattn.fashion_mnist.train --epochs 2",
                    f"python -m pruneattn.fashion_mnist.train --out={DEFAULT_WEIGHTS}"):
        words = demo.training_command({"command": command}).split()
        assert words.count("--out") == 1 and not any(w.startswith("--out=") for w in words), words
        target = Path(words[words.index("--out") + 1]).resolve()
        assert target == demo.TRAIN_OUT.resolve() and target != DEFAULT_WEIGHTS.resolve()


def test_dropped_patches_have_a_colour_no_image_pixel_has():
    """Kept pixels are grey (the image), dropped ones the dropped colour, far from every grey."""
    img = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)  # every shade from black to near white
    keep = np.zeros((8, 8), dtype=bool)
    keep[:, :4] = True
    rgb = demo.panel_rgb(img, keep)
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    kept, dropped = rgb[keep], rgb[~keep]
    assert np.allclose(kept, img[keep, None] / 255.0)  # grey: r == g == b
    assert np.allclose(dropped, demo.DROPPED_COLOR)
    assert np.ptp(np.asarray(demo.DROPPED_COLOR)) > 0.5  # far from r == g == b


def test_panel_titles_count_patches_and_show_the_prediction():
    assert demo.panel_title("var", 3, 45, None, 0) == "var: after block 3\n45 patches kept"
    wrong = demo.panel_title("mad", 9, 23, 2, 0)
    assert "WRONG" in wrong and datasets.CLASSES[2] in wrong
    right = demo.panel_title("mad", 9, 23, 0, 0)
    assert "right" in right and datasets.CLASSES[0] in right


def test_progress_bars_are_optional(monkeypatch, fast_backend):
    """Without tqdm the demo predicts the same and the training's bar calls do nothing."""
    import sys

    import torch

    from pruneattn._progress import progress_bar
    from pruneattn.fashion_mnist.train import load_model

    model, ckpt = load_model()
    images, _ = datasets.load_sample()
    x = datasets.normalize(datasets.make_view(images[:8], np.arange(8), canvas=ckpt["config"]["canvas"], seed=0))
    with_bars = demo.predict(model, x, batch_size=4, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert torch.equal(demo.predict(model, x, batch_size=4, progress=True), with_bars)
    bar = progress_bar(total=3, desc="train", unit="step")
    bar.update(1)
    bar.set_postfix(loss="0.100", refresh=False)
    bar.close()
    assert list(progress_bar(range(3), desc="eval")) == [0, 1, 2]
