"""pytest plugin of ``tools/conformance.py``: runs another project's tests with every model they build
patched by pruneattn at keep rate 1.0, and records each test's outcome.

Loaded with ``-p tools.conformance_plugin`` (the repository root on ``sys.path``); set by environment:

- ``PRUNEATTN_CONFORMANCE``: ``patched`` (patch) or ``unpatched`` (record only, the baseline run).
- ``PRUNEATTN_CONFORMANCE_LOG``: a JSON-lines file; one line per test: node id, outcome (passed, failed,
  error, skipped), the failure's last line, and how many models the test had patched.
- ``PRUNEATTN_CONFORMANCE_SETTINGS``: optional comma-separated adjustments of the models the tests build,
  made in both modes: ``tower_full_attention`` gives a Qwen2.5-VL vision tower whose full-attention blocks
  all lie beyond its depth (transformers' test tower) its last block as its full-attention block.
- ``PRUNEATTN_CONFORMANCE_SELECT``: optional JSON list of ``fnmatch`` patterns over node ids; other tests
  are deselected (for test files parametrized over thousands of models, such as timm's).

Patched are: every Hugging Face model at the end of its ``__init__`` (``post_init``, so inner models such
as a VLM's vision tower too, then the outer one again), and every model ``timm.create_model`` returns,
whose class (or a base class) pruneattn supports and does not refuse. A ``patch`` that raises is left to
raise: the test then fails patched only, with pruneattn's message.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os

import pytest

MODE = os.environ.get("PRUNEATTN_CONFORMANCE", "unpatched")
SETTINGS = frozenset(filter(None, os.environ.get("PRUNEATTN_CONFORMANCE_SETTINGS", "").split(",")))
_patched = [0]  # models patched during the running test
_worker = [False]  # this process is a pytest-xdist worker (its controller writes the log)


def _supported(model: object) -> bool:
    from pruneattn.patch import registry

    if registry.refusal(model) is not None:
        return False
    return registry.family_of(model) is not None or registry.vision_language_of(model) is not None


def _patch(model: object) -> None:
    import pruneattn

    if _supported(model):
        pruneattn.patch(model, keep_rate=1.0)
        _patched[0] += 1


def _then_patch(fn, model_of):
    """``fn`` that patches the model ``model_of(args, result)`` after it ran."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        _patch(model_of(args, out))
        return out

    return wrapper


def _install_transformers() -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    PreTrainedModel.post_init = _then_patch(PreTrainedModel.post_init, lambda args, out: args[0])


def _install_timm() -> None:
    try:
        import timm
        import timm.models
        import timm.models._factory as factory
    except ImportError:
        return
    create_model = _then_patch(factory.create_model, lambda args, out: out)
    for module in (factory, timm.models, timm):
        module.create_model = create_model


def _install_tower_full_attention() -> None:
    """A Qwen2.5-VL tower built with no full-attention block within its depth gets its last block as one."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    tower = qwen.Qwen2_5_VisionTransformerPretrainedModel
    init = tower.__init__

    @functools.wraps(init)
    def __init__(self, config, *args, **kwargs):
        if not any(0 <= i < config.depth for i in config.fullatt_block_indexes):
            config.fullatt_block_indexes = [config.depth - 1]
        init(self, config, *args, **kwargs)

    tower.__init__ = __init__


def pytest_configure(config: pytest.Config) -> None:
    _worker[0] = hasattr(config, "workerinput")
    if "tower_full_attention" in SETTINGS:
        _install_tower_full_attention()
    if MODE == "patched":
        _install_transformers()
        _install_timm()


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    patterns = json.loads(os.environ.get("PRUNEATTN_CONFORMANCE_SELECT", "null"))
    if patterns is None:
        return
    keep = [item for item in items if any(fnmatch.fnmatchcase(item.nodeid, p) for p in patterns)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    _patched[0] = 0


def _last_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else ""


_OUTCOMES: dict[str, dict] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One record per test: a failing setup or teardown is an error, a failing call a failure."""
    record = _OUTCOMES.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "message": ""})
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if report.failed and report.when != "call":
            outcome = "error"
        if record["outcome"] in ("passed", "skipped"):
            record.update(outcome=outcome, message=_last_line(report) if report.outcome != "passed" else "")
    if report.when == "call":
        record["patched_models"] = dict(report.user_properties).get("pruneattn_patched", 0)
    if report.when == "teardown":
        path = os.environ.get("PRUNEATTN_CONFORMANCE_LOG")
        if path and not _worker[0]:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(_OUTCOMES.pop(report.nodeid)) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Carry the count of patched models on the report (it reaches the controller under xdist)."""
    outcome = yield
    if call.when == "call":
        outcome.get_result().user_properties.append(("pruneattn_patched", _patched[0]))
