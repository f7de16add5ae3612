"""``tools/conformance.py`` plumbing on a fake project's test file (no downloads): the plugin patches the
models the tests build (timm's ``create_model``, transformers' ``post_init``), outcomes are recorded per
test, selection by node-id patterns works, and the patched-only failures are those that pass unpatched."""
from __future__ import annotations

import fnmatch
import textwrap

import pytest

from tools import conformance

FAKE = textwrap.dedent(
    '''
    import pytest
    import timm
    import torch
    from timm.models.vision_transformer import Block


    def _vit():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3)


    def test_forward():
        assert _vit().eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


    def test_blocks_are_plain():  # a patched model's pruning block has another class
        assert all(type(b) is Block for b in _vit().blocks)


    def test_hugging_face_model():
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=8, patch_size=4)
        assert ViTModel(config).eval()(torch.randn(1, 3, 8, 8)).last_hidden_state.shape == (1, 5, 32)


    def test_fails_anyway():
        assert 1 == 2


    @pytest.mark.skip(reason="not here")
    def test_skipped():
        pass


    @pytest.fixture
    def broken():
        raise RuntimeError("broken fixture")


    def test_setup_error(broken):
        pass
    '''
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "tests").mkdir()
    (root / "tests" / "test_fake.py").write_text(FAKE, encoding="utf-8")
    suite = conformance.Suite("fake", "timm", "tests/test_fake.py")
    return {mode: conformance.run(suite, root, mode, root / f"{mode}.jsonl", timeout=600)
            for mode in ("unpatched", "patched")}, root


def test_outcomes_of_both_runs(runs):
    (unpatched, patched), _ = runs[0].values(), runs[1]
    outcome = lambda run: {k.split("::")[-1]: v["outcome"] for k, v in run.outcomes.items()}  # noqa: E731
    assert outcome(unpatched) == {"test_forward": "passed", "test_blocks_are_plain": "passed",
                                  "test_hugging_face_model": "passed", "test_fails_anyway": "failed",
                                  "test_skipped": "skipped", "test_setup_error": "error"}
    assert outcome(patched) == {**outcome(unpatched), "test_blocks_are_plain": "failed"}
    assert unpatched.counts() == {"passed": 3, "failed": 1, "error": 1, "skipped": 1}
    patched_models = {k.split("::")[-1]: v.get("patched_models", 0) for k, v in patched.outcomes.items()}
    assert patched_models["test_forward"] == 1 and patched_models["test_hugging_face_model"] == 1
    assert not any(v.get("patched_models") for v in unpatched.outcomes.values())


def test_patched_only_failures(runs):
    unpatched, patched = runs[0]["unpatched"], runs[0]["patched"]
    (failure,) = conformance.patched_only(unpatched, patched)
    assert failure["test"].endswith("::test_blocks_are_plain") and failure["outcome"] == "failed"
    assert "assert" in failure["message"]
    missing = conformance.Run(outcomes={})
    assert len(conformance.patched_only(unpatched, missing)) == 3  # a patched run that stopped: all missing


def test_selection_by_node_id(runs, tmp_path):
    root = runs[1]
    suite = conformance.Suite("fake", "timm", "tests/test_fake.py", select=("*::test_forward", "*::test_skipped"))
    run = conformance.run(suite, root, "unpatched", tmp_path / "log.jsonl", timeout=600)
    assert sorted(k.split("::")[-1] for k in run.outcomes) == ["test_forward", "test_skipped"]


def test_model_patterns_match_whole_model_names():
    patterns = conformance.model_patterns(("test_vit", "vit_tiny_patch16_224"))
    match = lambda nodeid: any(fnmatch.fnmatchcase(nodeid, p) for p in patterns)  # noqa: E731
    assert match("tests/test_models.py::test_model_forward[1-test_vit]")
    assert match("tests/test_models.py::test_model_default_cfgs_non_std[1-vit_tiny_patch16_224.augreg_in21k]")
    assert match("tests/test_models.py::test_vit_classifier_checkpoint[False-test_vit-avg-0-model_kwargs0]")
    assert not match("tests/test_models.py::test_model_forward[1-test_vit2]")
    assert not match("tests/test_models.py::test_model_forward[1-test_vit_relpos]")


def test_report(runs):
    unpatched, patched = runs[0]["unpatched"], runs[0]["patched"]
    results = {"date": "2026-01-01 00:00", "machine": {"platform": "linux", "cpus": 2}, "minutes": 1.0,
               "versions": {"timm": "1.0.31"}, "sources": {"timm": "a folder"},
               "suites": [{"name": "fake", "file": "tests/test_fake.py", "tests": 6, "unpatched": unpatched.counts(),
                           "patched": patched.counts(), "tests_with_patched_model": 2, "minutes": 0.5,
                           "patched_only": conformance.patched_only(unpatched, patched)}]}
    text = conformance.markdown(results)
    assert "| fake | `tests/test_fake.py` | 6 | 3 | 2 | 1 | 2 | 0.5 | ?, 2026-01-01 00:00 |" in text
    assert "test_blocks_are_plain` (failed)" in text


QWEN_TOWER = textwrap.dedent(
    '''
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


    def test_tower_without_full_attention_block():  # as transformers' Qwen2.5-VL test builds it
        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2,
                             rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=37, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=1, temporal_patch_size=2),
            image_token_id=60, video_token_id=61, vision_start_token_id=62)
        model = Qwen2_5_VLForConditionalGeneration(config)
        assert list(model.model.visual.config.fullatt_block_indexes) == [1]
    '''
)


@pytest.mark.parametrize("settings", [(), ("tower_full_attention",)])
def test_setting_a_full_attention_block_in_both_runs(tmp_path, settings):
    """``tower_full_attention`` gives transformers' Qwen2.5-VL test tower a full-attention block, unpatched
    and patched alike, so the patched run patches it; without it the patched run is refused."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_qwen.py").write_text(QWEN_TOWER, encoding="utf-8")
    suite = conformance.Suite("qwen", "transformers", "tests/test_qwen.py", settings=settings)
    runs = {mode: conformance.run(suite, tmp_path, mode, tmp_path / f"{mode}.jsonl", timeout=600)
            for mode in ("unpatched", "patched")}
    ((_, unpatched),), ((_, patched),) = runs["unpatched"].outcomes.items(), runs["patched"].outcomes.items()
    if settings:
        assert unpatched["outcome"] == patched["outcome"] == "passed", (unpatched, patched)
        assert patched["patched_models"] >= 1
    else:  # the default indexes (7, 15, 23, 31) lie beyond a 2-block tower: the assert fails, patch refuses
        assert unpatched["outcome"] == "failed" and patched["outcome"] == "failed"
        assert "pruneattn" in patched["message"], patched


def test_report_names_a_suite_setting():
    results = {"date": "2026-01-01 00:00", "machine": {"platform": "linux", "cpus": 2}, "minutes": 1.0,
               "versions": {}, "sources": {}, "suites": [
                   {"name": "q", "file": "t.py", "settings": ["tower_full_attention"], "tests": 1,
                    "unpatched": {"passed": 1}, "patched": {"passed": 1}, "tests_with_patched_model": 1,
                    "minutes": 0.1, "patched_only": []}]}
    assert f"| q | `t.py` ({conformance.SETTINGS['tower_full_attention']}) | 1 |" in conformance.markdown(results)


def test_update_replaces_the_suites_run_again():
    def report(pruneattn, date, suites, torch="2.14.1"):
        return {"date": date, "machine": {"platform": "linux", "cpus": 2}, "minutes": 0.0, "sources": {"timm": "x"},
                "versions": {"torch": torch, "pruneattn": pruneattn},
                "suites": [{"name": n, "file": f"{n}.py", "tests": t, "unpatched": {"passed": t},
                            "patched": {"passed": t}, "tests_with_patched_model": t, "minutes": 1.0,
                            "patched_only": []} for n, t in suites]}
    old = report("aaa", "2026-01-01 00:00", [("a", 1), ("b", 2)])
    new = report("bbb", "2026-01-02 00:00", [("b", 3), ("c", 4)])
    for suite in new["suites"]:
        suite.update(pruneattn="bbb", date="2026-01-02 00:00")
    merged = conformance.updated(old, new)
    assert [(s["name"], s["tests"], s["pruneattn"], s["date"]) for s in merged["suites"]] == [
        ("a", 1, "aaa", "2026-01-01 00:00"), ("b", 3, "bbb", "2026-01-02 00:00"), ("c", 4, "bbb", "2026-01-02 00:00")]
    assert merged["minutes"] == 3.0
    text = conformance.markdown(merged)
    assert "| a | `a.py` | 1 | 1 | 1 | 0 | 1 | 1.0 | aaa, 2026-01-01 00:00 |" in text
    assert "| b | `b.py` | 3 | 3 | 3 | 0 | 3 | 1.0 | bbb, 2026-01-02 00:00 |" in text
    with pytest.raises(SystemExit, match="other versions of torch"):
        conformance.updated(old, report("bbb", "2026-01-02 00:00", [("b", 3)], torch="2.15.0"))
