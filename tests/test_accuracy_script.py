"""``tools/accuracy.py`` end to end on a tiny slice: every part runs, shards of one part merge in the
report, and the report's numbers are the JSON's.

The data folder is made from the shipped sample (written as idx files), so this runs without the
Debian package; the pruning blocks use the fast CPU path (the kernels have their own tests).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pruneattn
from helpers import write_idx
from pruneattn.fashion_mnist import datasets
from pruneattn.validate import STATS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def accuracy(tmp_path, monkeypatch):
    """The script as a module, reading a data folder made of the shipped sample (as train and as test)."""
    images, labels = datasets.load_sample()
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images, 0x08)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8), 0x08)
    monkeypatch.setenv("PRUNEATTN_FASHION_MNIST", str(tmp_path))
    spec = importlib.util.spec_from_file_location("accuracy_script", ROOT / "tools" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pruneattn.use_backend("cpu"):
        yield mod
    torch.set_num_threads(n)


def test_every_part_runs_and_the_report_merges_shards(accuracy, tmp_path):
    res = tmp_path / "results"
    ft = ["--ft-epochs", "0.25", "--batch-size", "16", "--ft-warmup", "1", "--test-limit", "32"]
    runs = {
        "a": ["--part", "a", "--test-limit", "32", "--random-seeds", "2"],
        "b_s0": ["--part", "b", *ft, "--seed-list", "0", "--stat-list", "none,var"],
        "b_s1": ["--part", "b", *ft, "--seed-list", "1", "--stat-list", "var"],
        "c": ["--part", "c", *ft, "--seed-list", "0", "--stat-list", "var", "--c-runs", "overlap"],
        "t": ["--part", "t", "--t-batch", "16", "--t-rounds", "1", "--t-iters", "1"],
        "f": ["--part", "f", "--test-limit", "32"],
    }
    for name, argv in runs.items():
        assert accuracy.main([*argv, "--out", str(res / f"accuracy_{name}.json")]) == 0
    b0 = json.loads((res / "accuracy_b_s0.json").read_text())["rows"]
    b1 = json.loads((res / "accuracy_b_s1.json").read_text())["rows"]
    assert [(r["stat"], r["seed"]) for r in b0] == [("none", 0), ("var", 0)]
    assert [(r["stat"], r["seed"]) for r in b1] == [("var", 1)]
    assert all(r["ft_steps"] == 1 and r["n"] == 32 for r in b0 + b1)  # 0.25 of 64 images at batch 16
    c = json.loads((res / "accuracy_c.json").read_text())["rows"]
    assert [(r["stat"], r["ft_epochs"], r["overlap"]) for r in c] == [("var", 0, [6, 2]), ("var", 0.25, [6, 2])]
    assert c[0]["tokens_per_block"][0] == 82  # 9 x 9 overlapping patches + class token

    assert accuracy.main(["--report", "--results", str(res)]) == 0
    md = (res / "accuracy.md").read_text()
    for title in ("## (a) Trained model", "## (b) After a short fine-tuning", "## (c) Overlapping patch",
                  "## Throughput", "## Which patches are kept"):
        assert title in md
    # the two shards of part b merged: var has both seeds, with mean ± std of their accuracies
    var = [100 * r["top1"] for r in b0 + b1 if r["stat"] == "var"]
    import statistics

    cell = f"{statistics.mean(var):.2f} ± {statistics.stdev(var):.2f} (n=2)"
    assert any(line.startswith("| - | var | 0.5 | 0.25 |") and cell in line for line in md.splitlines()), md
    assert "seeds [0, 1]" in md
    assert (res / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_shard_choices_are_refused(accuracy, tmp_path):
    with pytest.raises(SystemExit, match="entropy.*not among"):
        accuracy.main(["--part", "b", "--stat-list", "var,entropy", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="mean.*not among"):  # part c compares var and mad only
        accuracy.main(["--part", "c", "--stat-list", "mean", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="0.6.*not among"):
        accuracy.main(["--part", "a", "--keep-list", "0.7,0.6", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="none.*not among"):  # part a always runs the unpruned model once
        accuracy.main(["--part", "a", "--stat-list", "none", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="wide.*not among"):
        accuracy.main(["--part", "c", "--c-runs", "overlap,wide", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_head_count_report_pairs_the_rows_of_each_model(accuracy, tmp_path):
    """Part a of two models with different head counts, then --report-heads: the gaps are the rows'
    top-1 differences, their intervals come from the per-image results, and each model is listed."""
    from pruneattn.fashion_mnist.train import DEFAULT_CONFIG, build_model, save_checkpoint

    heads = tmp_path / "heads"
    config = dict(DEFAULT_CONFIG, embed_dim=96, num_heads=6)
    torch.manual_seed(0)
    save_checkpoint(build_model(config), config, tmp_path / "h6.pt", meta={"steps": 7, "train_seconds": 60.0})
    for name, weights in (("h4", []), ("h6", ["--weights", str(tmp_path / "h6.pt")])):
        argv = ["--part", "a", "--test-limit", "40", "--stat-list", "var,mad,mean", "--keep-list", "0.5", *weights]
        assert accuracy.main([*argv, "--out", str(heads / name / "accuracy_a.json")]) == 0
    assert accuracy.main(["--report-heads", "--heads-results", str(heads)]) == 0
    md = (heads / "heads.md").read_text()
    assert (heads / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 6 | 96 | 16 |" in md and "| 4 | 128 | 32 |" in md
    rows = json.loads((heads / "h6" / "accuracy_a.json").read_text())["rows"]
    by = {r["stat"]: r for r in rows if r["keep"] == 0.5 and r["mode"] == "fuse"}
    assert all(accuracy.unpack_correct(r).sum() == round(r["top1"] * 40) for r in rows)
    right = {s: accuracy.unpack_correct(by[s]).astype(float) for s in ("var", "mad")}
    d = right["mad"] - right["var"]
    half = 100 * 1.96 * d.std(ddof=1) / np.sqrt(40)
    gap = f"{100 * (by['mad']['top1'] - by['var']['top1']):+.2f} ± {half:.2f}"
    line = next(s for s in md.splitlines() if s.startswith("| fuse | 0.5 | 6 |"))
    assert gap in line, (gap, line)
    assert "| 4 | not run |" in md and "| 6 | not run |" in md  # no fine-tuning results yet
    assert {(r["stat"], r["keep"]) for r in rows} == {("none", 1.0), ("var", 0.5), ("mad", 0.5), ("mean", 0.5)}
    assert "random" not in md.split("## No fine-tuning")[1].splitlines()[2]  # no random column: not run

    # Fine-tuning shards, one file per score and seed, join into the fine-tuned table: mad - var is the
    # difference of the seed means ± its standard error; mean - var needs two seeds of mean.
    ft = ["--part", "b", "--ft-epochs", "0.25", "--batch-size", "16", "--ft-warmup", "1", "--test-limit", "40",
          "--weights", str(tmp_path / "h6.pt")]
    for stat, seed in (("var", 0), ("mad", 0), ("var", 1), ("mad", 1), ("mean", 0)):
        out = heads / "h6" / f"accuracy_b_{stat}_s{seed}.json"
        assert accuracy.main([*ft, "--stat-list", stat, "--seed-list", str(seed), "--out", str(out)]) == 0
    assert accuracy.main(["--report-heads", "--heads-results", str(heads)]) == 0
    md = (heads / "heads.md").read_text()
    tuned = {s: [] for s in STATS}
    for f in sorted((heads / "h6").glob("accuracy_b_*.json")):
        for r in json.loads(f.read_text())["rows"]:
            tuned[r["stat"]].append(100 * r["top1"])
    diff = np.mean(tuned["mad"]) - np.mean(tuned["var"])
    se = np.sqrt(np.var(tuned["mad"], ddof=1) / 2 + np.var(tuned["var"], ddof=1) / 2)
    line = next(s for s in md.split("## After fine-tuning")[1].splitlines() if s.startswith("| 6 |"))
    assert line.endswith(f"| {diff:+.2f} ± {se:.2f} | - |"), line
    assert "| 4 | not run |" in md and "0.25 epoch(s)" in md


def test_shards_of_different_weights_are_not_joined(accuracy, tmp_path):
    """Two part a shards in one model's folder must be of the same parameters: a retrained model with other
    weights (same file name) is refused, by its parameter digest and by its unpruned predictions."""
    from pruneattn.fashion_mnist.train import DEFAULT_CONFIG, build_model, save_checkpoint

    config = dict(DEFAULT_CONFIG, embed_dim=96, num_heads=6)
    folder = tmp_path / "heads" / "h6"
    argv = ["--part", "a", "--test-limit", "40", "--stat-list", "var", "--keep-list", "0.5",
            "--weights", str(tmp_path / "h6.pt")]
    for seed, shard in ((0, "accuracy_a.json"), (0, "accuracy_a_again.json"), (1, "accuracy_a_other.json")):
        torch.manual_seed(seed)
        save_checkpoint(build_model(config), config, tmp_path / "h6.pt", meta={"steps": 7, "train_seconds": 60.0})
        assert accuracy.main([*argv, "--out", str(folder / shard)]) == 0
    digests = [json.loads((folder / f).read_text())["meta"]["params_sha256"]
               for f in ("accuracy_a.json", "accuracy_a_again.json", "accuracy_a_other.json")]
    assert digests[0] == digests[1] != digests[2]
    with pytest.raises(SystemExit, match="different weights"):
        accuracy._load_part(folder, "a")
    (folder / "accuracy_a_other.json").unlink()
    assert len(accuracy._load_part(folder, "a")["rows"]) == 6  # the same weights twice join

    # Older files carry no digest: their unpruned rows still tell two models apart.
    other = json.loads((folder / "accuracy_a.json").read_text())
    del other["meta"]["params_sha256"]
    none = next(r for r in other["rows"] if r["stat"] == "none")
    bits = accuracy.unpack_correct(none)
    bits[0] = not bits[0]
    none["correct"] = accuracy.pack_correct(bits)
    (folder / "accuracy_a_old.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different weights"):
        accuracy._load_part(folder, "a")


def test_head_count_report_needs_part_a(accuracy, tmp_path):
    (tmp_path / "heads" / "h6").mkdir(parents=True)
    (tmp_path / "heads" / "h6" / "accuracy_f.json").write_text("{}")
    with pytest.raises(SystemExit, match="no accuracy_a.json"):
        accuracy._heads_parts(tmp_path / "heads" / "h6")


def test_random_control_keeps_a_seeded_random_subset(accuracy):
    """The control's scores really are random: it keeps other patches than the mean score it is patched
    with, a seed gives the same patches again, and the kept patches are spread over the whole grid."""
    from pruneattn.fashion_mnist.train import load_model

    model, ckpt = load_model()
    images, _ = datasets.load_sample()
    x = datasets.normalize(datasets.make_view(images, np.arange(len(images)), canvas=ckpt["config"]["canvas"], seed=0))

    def kept(stat, seed=0):
        accuracy.patch_model(model, keep_rate=0.5, stat=stat, seed=seed)
        with torch.no_grad():
            model(x)
        return pruneattn.kept_indices(model)[3]

    mean, r0, r0_again, r1 = kept("mean"), kept("random", 0), kept("random", 0), kept("random", 1)
    assert torch.equal(r0, r0_again) and not torch.equal(r0, r1)
    overlap = (mean.unsqueeze(2) == r0.unsqueeze(1)).any(2).float().mean()
    assert overlap < 0.8, float(overlap)  # mean and random share about half of the kept patches by chance
    accuracy.unpatch_model(model)
