"""``pruneattn bench --vlm``: the smoke suite end to end, the FLOP count against a hand count and torch's
FLOP counter, the eager baseline's selection against pruneattn's, and the device plumbing (GPU timers and
memory readers picked and computed without a GPU). No timing is asserted."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

import pruneattn
from pruneattn.bench import vlm as V
from pruneattn.bench import vlm_flops as F
from pruneattn.bench import vlm_models as VM

META = {"device", "torch", "triton", "date", "dtype"}


def test_smoke_suite_writes_its_files(tmp_path, cpu_backend):
    """``pruneattn bench --vlm --smoke`` as a CPU runs it (pruneattn's CPU path, not the Triton interpreter)."""
    from pruneattn.bench import SMOKE_NOTE, TIMING_VERDICTS, main

    assert main(["--vlm", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "vlm.json").read_text())
    assert data["smoke"] is True and data["note"] == SMOKE_NOTE
    assert {"device", "torch", "triton", "date", "threads", "load_average_1min"} <= set(data["environment"])
    assert "load_average_end" in data and data["settings"]["ttft_reps"] == 1
    configs = {r["config"] for r in data["rows"]}
    assert configs == {"unpatched"} | {f"{kind} {k}" for k in (8, 4)
                                       for kind in ("pruneattn drop", "pruneattn fuse", "eager baseline")}
    assert {r["model"] for r in data["rows"]} == {"tiny-llava", "tiny-paligemma"}
    for r in data["rows"]:
        assert META <= set(r) and r["smoke"] is True
        assert r["ttft_ms"] > 0 and r["decode_ms_per_step"] > 0 and r["peak_mb"] > 0 and r["ttft_cpu_s"] > 0
        assert r["decode_steps"] == 4  # the first token, then 4 decode steps
        if r["kind"] == "pruneattn" and r["mode"] == "drop":
            assert r["same_kept_as_eager"] == 1.0
        expected = {"unpatched": 16, "eager": r["tokens"]}.get(r["kind"], r["tokens"] + (r["mode"] == "fuse"))
        assert r["image_tokens_to_lm"] == expected
    assert not any(k in TIMING_VERDICTS for c in data["checks"] for k in c)
    md = (tmp_path / "vlm.md").read_text()
    assert "(smoke run)" in md.splitlines()[0] and SMOKE_NOTE in md
    assert not any(k in md for k in TIMING_VERDICTS)
    assert (tmp_path / "vlm.png").stat().st_size > 1000


def _tiny_shape(case):
    return F.shape_of(VM.config(case), case.text_tokens)


def test_flop_count_matches_a_hand_count():
    # tiny LLaVA: CLIP tower width 64, MLP 128, 4 blocks, 32 px / 8 = 16 patches + class = 17 tokens; feature
    # layer -2 = block 2; projector 64 -> 32 -> 32; Qwen2 LM width 32, 2 layers, 4 heads of 8, 2 KV heads,
    # MLP 64, vocab 128; prompt 6 text tokens + 16 placeholders = 22.
    s = _tiny_shape(VM.TINY_LLAVA)
    assert (s.feature_block, s.patches, s.prefix, s.drops_first) == (2, 16, 1, True)

    def block(na, nm):  # q, k, v, out: 4 of 64 x 64; attention 4 N^2 d; fc1 + fc2: 2 of 64 x 128
        return 2 * na * 4 * 64 * 64 + 4 * na * na * 64 + 2 * nm * 2 * 64 * 128

    def lm(n, ctx):  # per layer: q 32x32, k, v 32x16, o 32x32, gate/up/down 32x64; attention 4 n ctx 32
        return 2 * (2 * n * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64) + 4 * n * ctx * 32)

    embed = 2 * 16 * (3 * 8 * 8) * 64
    logits = 2 * 32 * 128
    proj = 2 * (64 * 32 + 32 * 32)  # per image token
    unpatched = embed + 4 * block(17, 17) + 16 * proj + lm(22, 22) + logits
    assert F.prefill_flops(s) == unpatched
    # pruneattn fuse 4: blocks 0, 1 on 17; block 2's attention on 17, its MLP on 1 + 4 + 1; block 3 on 6;
    # the LM reads 4 + 1 image tokens (class dropped): prompt 11
    fuse4 = embed + 2 * block(17, 17) + block(17, 6) + block(6, 6) + 5 * proj + lm(11, 11) + logits
    assert F.prefill_flops(s, F.Pruning("tower", 4, True)) == fuse4
    # eager baseline 4: the whole tower, 4 image tokens to the projector and the LM
    eager4 = embed + 4 * block(17, 17) + 4 * proj + lm(10, 10) + logits
    assert F.prefill_flops(s, F.Pruning("projector", 4)) == eager4
    assert F.bound(s, F.Pruning("tower", 4, True)) == unpatched / fuse4
    # decode, 3 steps after the prefill: step t attends over 22 + t keys
    assert F.decode_flops(s, steps=3) == sum(lm(1, 22 + t) + logits for t in (1, 2, 3)) / 3

    # tiny PaliGemma: SigLIP width 64, MLP 128, 3 blocks, 16 patches, no class token, feature block = last;
    # projector 64 -> 32; Gemma LM 2 layers, 4 heads of 8, 1 KV head, MLP 64; prompt 16 + 6
    s = _tiny_shape(VM.TINY_PALIGEMMA)
    assert (s.feature_block, s.prefix, s.drops_first) == (2, 0, False)

    def lm1(n, ctx):
        return 2 * (2 * n * (32 * 32 + 2 * 32 * 8 + 32 * 32 + 3 * 32 * 64) + 4 * n * ctx * 32)

    drop8 = embed + 2 * block(16, 16) + block(16, 8) + 8 * 2 * 64 * 32 + lm1(14, 14) + logits
    assert F.prefill_flops(s, F.Pruning("tower", 8)) == drop8
    assert F.prefill_flops(s) == embed + 3 * block(16, 16) + 16 * 2 * 64 * 32 + lm1(22, 22) + logits


def _eager_stats(q, k, v, *, stat, query, num_prefix, scale, valid=None, unit=1):
    """pruneattn's attention op in plain torch ops, so that torch's FLOP counter sees Q K^T and P V."""
    from pruneattn import reference as R
    from pruneattn.ops import AttentionStats

    attn = R.attention_probs(q, k, scale)
    a = R.received_attention(attn, query)[:, :, num_prefix:]
    return AttentionStats(attn @ v, R.head_statistic(a, stat).float(), a.mean(dim=1).float())


@pytest.mark.parametrize("case", [VM.TINY_LLAVA, VM.TINY_PALIGEMMA], ids=lambda c: c.name)
def test_flop_count_matches_torch_flop_counter(case, monkeypatch):
    """Every configuration's prefill (``generate`` of one token, batch 2) as torch's FlopCounterMode counts
    it with eager attention everywhere: the count covers what the models really run, pruning included."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(importlib.import_module("pruneattn.patch.prune"), "attention_stats", _eager_stats)
    model = VM.build(case)
    model.set_attn_implementation("eager")  # SDPA on the CPU is invisible to the counter
    s = F.shape_of(model.config, case.text_tokens)
    configs = V.configs_for(case.tokens)
    cands = V.candidates(V.module_trees(model, configs), configs, VM.prompt(case, 2))
    for c in configs:
        with FlopCounterMode(display=False) as fc:
            cands[c.name].generate(1)
        assert fc.get_total_flops() == 2 * F.prefill_flops(s, c.pruning), c.name
    with FlopCounterMode(display=False) as fc:  # 1 + 3 new tokens: the prefill and 3 decode steps
        cands["unpatched"].generate(4)
    assert fc.get_total_flops() == 2 * (F.prefill_flops(s) + 3 * F.decode_flops(s, steps=3))


@pytest.mark.parametrize("case", [VM.TINY_LLAVA, VM.TINY_PALIGEMMA], ids=lambda c: c.name)
def test_eager_baseline_keeps_what_pruneattn_keeps(case):
    model = VM.build(case)
    inputs = VM.prompt(case, 3, seed=1)
    k = case.tokens[-1]
    configs = (V.VLMConfig("pruneattn", k), V.VLMConfig("eager", k))
    cands = V.candidates(V.module_trees(model, configs), configs, inputs)
    pruned, eager = cands[f"pruneattn drop {k}"], cands[f"eager baseline {k}"]
    pruned.generate(1)
    eager.generate(1)
    kept = pruneattn.kept_indices(pruned.model)
    assert list(kept) == [F.shape_of(model.config, case.text_tokens).feature_block]
    assert eager.kept_patches().shape == (3, k)
    assert torch.equal(eager.kept_patches(), next(iter(kept.values())))
    # and the language model reads the same tokens: the baseline's logits are pruneattn drop's
    with torch.no_grad():
        ours = pruned.model(**inputs).logits
        theirs = eager.model(**eager.inputs, mm_encoder_outputs=eager.baseline.image_features(eager.pixels)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the unpatched model of the same weights is untouched by its patched and eager copies
    assert not hasattr(model.model, "_pruneattn_prompt") and model.model.vision_tower.config._attn_implementation == "sdpa"


def test_eager_scores_and_selection_follow_the_spec():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 5, 5, generator=g).softmax(-1)
    cls = V.eager_scores(attn, "cls", 1)
    assert torch.allclose(cls, attn[:, :, 0, 1:].var(dim=1, unbiased=False))
    mean = V.eager_scores(attn, "mean", 0)
    assert torch.allclose(mean, attn.mean(dim=2).var(dim=1, unbiased=False))
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9]])
    assert V.top_k_raster(scores, 3).tolist() == [[0, 1, 4]]  # ties go to the lower index, raster order


@pytest.mark.parametrize("case", [VM.TINY_LLAVA, VM.TINY_PALIGEMMA], ids=lambda c: c.name)
def test_baseline_prompt_is_the_processor_prompt_with_k_placeholders(case):
    short = V.short_prompt(VM.prompt(case, 2), case.image_token_id, 5)
    expected = VM.prompt(case, 2, image_tokens=5)
    assert set(short) == set(expected) - {"pixel_values"}
    for name, t in short.items():
        assert torch.equal(t, expected[name]), name


class _FakeEvent:
    """A CUDA event stand-in: ``elapsed_time`` in milliseconds between two records."""

    now = [0.0]

    def record(self):
        _FakeEvent.now[0] += 0.25
        self.t = _FakeEvent.now[0]

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_device_plumbing_without_a_gpu(monkeypatch):
    assert V.clock_for("cpu") is V.WallClock and V.clock_for("cuda") is V.EventClock
    wall = V.WallClock()
    for _ in range(3):
        wall.mark()
    assert len(wall.seconds()) == len(wall.cpu_seconds()) == 2 and wall.seconds() == sorted(wall.seconds())
    clock = V.EventClock(_FakeEvent)
    for _ in range(4):
        clock.mark()
    assert clock.seconds() == pytest.approx([0.25, 0.5, 0.75])
    gpu, cpu = V.settings_for("cuda"), V.settings_for("cpu")
    assert gpu.dtype == torch.bfloat16 and gpu.decode_reps == gpu.reps == 10 and gpu.warmup
    assert cpu.dtype == torch.float32 and (cpu.reps, cpu.decode_reps, cpu.new_tokens, cpu.warmup) == (3, 1, 32, False)
    smoke = V.settings_for("cuda", smoke=True)
    assert (smoke.reps, smoke.decode_reps, smoke.new_tokens, smoke.warmup) == (1, 1, 4, False)

    held = {"now": 100 * 2**20, "peak": 0}  # a fake CUDA allocator: fn allocates 8 MiB
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: held.update(peak=held["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: held["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: held["peak"])

    def allocate():
        held["peak"] = max(held["peak"], held["now"] + 8 * 2**20)

    assert V.peak_reader_for("cuda")(allocate) == 8.0
    mib = V.peak_reader_for("cpu")(lambda: torch.ones(2**20))  # 4 MiB of float32 on torch's CPU allocator
    assert math.isclose(mib, 4.0, rel_tol=0.01)


def test_checks_and_summary_judge_each_target():
    def row(config, kind, tokens, ttft, peak, mode="drop", bound=2.0):
        return {"model": "m", "batch": 1, "config": config, "kind": kind, "tokens": tokens, "mode": mode,
                "ttft_ms": ttft, "ttft_speedup": 100 / ttft, "ttft_flop_bound": bound,
                "bound_fraction": 100 / ttft / bound, "over_eager": 80 / ttft, "peak_mb": peak}

    rows = [row("unpatched", "unpatched", 576, 100, 50), row("pruneattn drop 64", "pruneattn", 64, 55, 40),
            row("pruneattn drop 128", "pruneattn", 128, 90, 60), row("eager baseline 64", "eager", 64, 80, 90),
            row("eager baseline 128", "eager", 128, 85, 90)]
    c = {x["config"]: x for x in V.checks(rows)}
    assert c["pruneattn drop 64"]["ttft_bound_ok"] is True  # 1.82x of a 2x bound: 91%
    assert "ttft_bound_ok" not in c["pruneattn drop 128"]  # judged at 64 tokens only
    assert c["pruneattn drop 128"]["over_eager_ok"] is False and c["pruneattn drop 128"]["below_unpatched_peak_ok"] is False
    s = {x["target"]: x for x in V.summary(V.checks(rows))}
    assert s[V.VERDICT_TEXT["over_eager_ok"]]["met"] == "1 of 2"
    assert s[V.VERDICT_TEXT["over_eager_ok"]]["missed"] == "m b1 pruneattn drop 128"


def test_qwen_suite_plumbing(tmp_path):
    """``pruneattn bench --vlm-qwen --smoke``: every configuration and batch has a row; pruneattn and the
    eager last block keep the same units; the image tokens the language model reads follow the rate."""
    import json

    from pruneattn.bench import main

    assert main(["--vlm-qwen", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "vlm_qwen.json").read_text())
    rows = {(r["batch"], r["config"]): r for r in res["rows"]}
    configs = ["unpatched", "pruneattn 0.25", "pruneattn 0.125", "eager last block 0.25", "eager last block 0.125"]
    assert sorted(rows) == sorted((b, c) for b in (1, 2) for c in configs)
    assert [rows[1, c]["image_tokens_to_lm"] for c in configs] == [256, 64, 32, 64, 32]
    assert [rows[2, c]["image_tokens_to_lm"] for c in configs] == [640, 160, 80, 160, 80]
    for b in (1, 2):
        assert rows[b, "unpatched"]["ttft_flop_bound"] == 1.0
        for c in configs[1:]:
            assert rows[b, c]["same_kept_as_eager"] is True
            assert rows[b, c]["ttft_flop_bound"] > 1.0 and rows[b, c]["ttft_ms"] > 0
    assert res["smoke"] is True and "Qwen2.5-VL" in (tmp_path / "vlm_qwen.md").read_text()


def test_internvl_suite_plumbing(tmp_path):
    """``pruneattn bench --vlm-internvl --smoke``: every configuration has a row; pruneattn and the eager
    last block keep the same units; each tile's image tokens follow the rate; the FLOP bound counts them."""
    import json

    from pruneattn.bench import main
    from pruneattn.bench import vlm_internvl as I

    assert main(["--vlm-internvl", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "vlm_internvl.json").read_text())
    rows = {(r["batch"], r["config"]): r for r in res["rows"]}
    configs = ["unpatched", "pruneattn 0.25", "pruneattn 0.125", "eager last block 0.25", "eager last block 0.125"]
    assert sorted(rows) == sorted((1, c) for c in configs)
    assert [rows[1, c]["image_tokens_to_lm"] for c in configs] == [512, 128, 64, 128, 64]  # two tiles of 256
    assert rows[1, "unpatched"]["ttft_flop_bound"] == 1.0
    for c in configs[1:]:
        assert rows[1, c]["same_kept_as_eager"] is True and rows[1, c]["ttft_flop_bound"] > 1.0
    assert res["smoke"] is True and "InternVL3-1B" in (tmp_path / "vlm_internvl.md").read_text()
    # the tower's count by hand: 2 tiles, width 64, MLP 128, 2 blocks of 1025 tokens, the last block's MLP on
    # the class token and 64 kept units of 4 patches; patch embedding 1024 x 588 x 64; projector 256 -> 64 -> 64
    model = I.build(2, 2, smoke=True)
    n, C, M, k = 1025, 64, 128, 64
    blocks = 2 * (2 * n * 4 * C * C + 4 * n * n * C) + 2 * 2 * C * M * (n + 1 + 4 * k)
    tower = 2 * (2 * 1024 * 588 * C + blocks + k * 2 * (4 * C * C + C * C))
    assert I.tower_flops(model.config.vision_config, C, 2, k) == tower


def test_qwen3_suite_plumbing(tmp_path):
    """``pruneattn bench --vlm-qwen3 --smoke``: every configuration and batch has a row; pruneattn and the
    eager last block keep the same units; the image tokens the language model reads follow the rate
    (448 x 448: 196 units; 896 x 672: 588); the targets are left out of a smoke run."""
    from pruneattn.bench import TIMING_VERDICTS, main

    assert main(["--vlm-qwen3", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "vlm_qwen3.json").read_text())
    rows = {(r["batch"], r["config"]): r for r in res["rows"]}
    configs = ["unpatched", "pruneattn 0.25", "pruneattn 0.125", "eager last block 0.25", "eager last block 0.125"]
    assert sorted(rows) == sorted((b, c) for b in (1, 2) for c in configs)
    assert [rows[1, c]["image_tokens_to_lm"] for c in configs] == [196, 49, 25, 49, 25]
    assert [rows[2, c]["image_tokens_to_lm"] for c in configs] == [784, 196, 99, 196, 99]
    for b in (1, 2):
        assert rows[b, "unpatched"]["ttft_flop_bound"] == 1.0
        for c in configs[1:]:
            assert rows[b, c]["same_kept_as_eager"] is True
            assert rows[b, c]["ttft_flop_bound"] > 1.0 and rows[b, c]["ttft_ms"] > 0
    assert res["settings"]["backend"] == "cpu" and res["settings"]["dtype"] == "float32"
    assert [c["config"] for c in res["checks"]] == configs[1:3] * 2
    assert not any(k in TIMING_VERDICTS for c in res["checks"] for k in c)
    md = (tmp_path / "vlm_qwen3.md").read_text()
    assert res["smoke"] is True and "Qwen3-VL-2B" in md and "DeepStack after blocks [0, 1]" in md


def test_qwen_suites_on_the_gpu_path_without_a_gpu():
    """What a GPU run does, on the CPU: the Triton kernels (here in the interpreter) score and keep the
    same units as the eager last block; the rows carry their device and dtype; the settings are the
    device's (``settings_for``). Images of 8 x 12 patches: the interpreter is slow."""
    from dataclasses import replace

    from pruneattn.bench import vlm_qwen, vlm_qwen3

    for suite in (vlm_qwen.QWEN25, vlm_qwen3.QWEN3):
        small = replace(suite, images={1: [(8 * suite.patch, 12 * suite.patch)]})
        res = vlm_qwen.run_rates(small, "cpu", smoke=True, backend="triton", batches=(1,), progress=False)
        assert res["settings"]["backend"] == "triton" and res["settings"]["ttft_reps"] == 1
        for r in res["rows"]:
            assert {"device", "dtype"} <= set(r) and r["ttft_ms"] > 0
            assert r["same_kept_as_eager"] in (None, True), r["config"]


def test_qwen3_tower_flop_count_matches_torch_flop_counter(monkeypatch):
    """The tower's count, unpatched and pruned (pruneattn's attention in plain torch ops so that torch's
    FlopCounterMode sees Q K^T and P V), with DeepStack mergers, on images of two sizes."""
    from torch.utils.flop_counter import FlopCounterMode

    from pruneattn.bench import vlm_qwen, vlm_qwen3

    monkeypatch.setattr(importlib.import_module("pruneattn.patch.prune"), "attention_stats", _eager_stats)
    model = vlm_qwen3.build(4, 2, smoke=True)
    model.set_attn_implementation("eager")
    inputs = vlm_qwen.prompt(vlm_qwen3.QWEN3, model, vlm_qwen3.QWEN3.images[2])
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    cfg = model.config.vision_config
    for rate in (None, 0.25):
        tower = model.model.visual if rate is None else pruneattn.patch(V.shared_copy(model), keep_rate=rate).model.visual
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        assert fc.get_total_flops() == vlm_qwen3.tower_flops(cfg, grids, vlm_qwen.kept_units(inputs, rate)[1]), rate
