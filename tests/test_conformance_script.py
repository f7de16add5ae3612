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
    assert "| fake | `tests/test_fake.py` | 6 | 3 | 2 | 1 | 2 | 0.5 |" in text
    assert "test_blocks_are_plain` (failed)" in text
