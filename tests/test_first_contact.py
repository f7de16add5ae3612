"""A new user's first steps: the README's set-up, imports from beside the clone, the command line's
speed and help, and what the demo says about its timing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import pruneattn
from pruneattn import cli
from pruneattn.fashion_mnist import datasets, demo

ROOT = Path(__file__).resolve().parents[1]


def _install_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Install", 1)[1].split("\n## ", 1)[0]


def test_readme_sets_up_a_virtual_environment_before_both_commands():
    section = _install_section()
    venv = section.index("python3 -m venv .venv && . .venv/bin/activate")
    assert "externally-managed-environment" in section[:venv]
    commands = [m.start() for m in re.finditer(r"```bash\n[^`]*pip install torch==", section)]
    assert len(commands) == 2 and all(venv < c for c in commands)
    for c in commands:  # each command's preamble names the environment
        preamble = section[:c].rsplit("```", 1)[1]
        assert "in the activated virtual environment" in preamble, preamble


def test_readme_says_the_size_of_the_default_install():
    section = _install_section()
    assert "about 3 GB" in section and "5.8 GB on disk" in section and "CUDA libraries" in section


MAIN_JOB = 'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[models]" && pruneattn demo'
TESTS = 'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]" && python -m pytest -q -n 2'
CPU_TORCH = "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_gives_the_two_commands_and_the_data_apart():
    """Exactly the main job and the tests, each one line; Debian's data set in a block of its own, so that
    a machine without apt-get still installs and runs."""
    blocks = _bash_blocks(_install_section())
    commands = [b for b in blocks if "pip install torch==" in b]
    assert commands == [MAIN_JOB, TESTS]
    apt = [b for b in blocks if "apt-get install -y dataset-fashion-mnist" in b]
    assert len(apt) == 1 and "pip" not in apt[0]


def test_readme_puts_both_torch_builds_side_by_side_with_durations():
    section = _install_section()
    assert CPU_TORCH in section and "`pip install torch==2.14.1 torchvision==0.29.1`" in section
    assert section.index(CPU_TORCH) < section.index(MAIN_JOB)  # chosen before the commands run
    assert "about 90 s" in section and "10 to 25 minutes" in section


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_from_the_folder_that_holds_the_clone(tmp_path):
    """A script beside a clone named ``pruneattn`` imports the installed package, not the clone's folder
    (setup.py's editable install puts the clone on sys.path)."""
    try:
        metadata.distribution("pruneattn")
    except metadata.PackageNotFoundError:
        pytest.skip("pruneattn is not installed here (pip install -e . installs it)")
    (tmp_path / "pruneattn").symlink_to(ROOT, target_is_directory=True)
    res = _run("import pruneattn; print(pruneattn.__file__); print(pruneattn.attention_scores.__name__)", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    file, name = res.stdout.split()
    assert file.endswith(os.path.join("pruneattn", "__init__.py")) and name == "attention_scores"


def test_version_and_import_do_not_import_torch():
    code = ("import sys\nimport pruneattn\nfrom pruneattn import cli\nassert cli.main(['--version']) == 0\n"
            "print('torch' in sys.modules)")
    res = _run(code, ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == [f"pruneattn {pruneattn.__version__}", "False"], res.stdout


def test_public_names_load_on_first_use_and_patch_stays_the_function():
    code = ("import pruneattn.patch.registry\nimport pruneattn\n"
            "assert callable(pruneattn.patch) and pruneattn.patch.__module__ == 'pruneattn.patch'\n"
            "assert set(pruneattn.__all__) <= set(dir(pruneattn))\n"
            "from pruneattn import *\nassert select_tokens is pruneattn.select_tokens\n"
            "import torch\nassert torch.ops.pruneattn.attention_stats is not None\n")
    res = _run(code, ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pruneattn.nothing_here  # noqa: B018


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_help_shows_no_code_marks(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and f"pruneattn {command}" in out


def test_timing_note_says_how_and_warns_on_a_busy_machine():
    calm = demo.timing_note(5, 1.1, 1.9, 2)
    assert "best of 5 rounds" in calm and "taking turns" in calm and "1.10 at start, 1.90 at end, on 2 CPUs" in calm
    assert "busy" not in calm
    busy = demo.timing_note(5, 3.9, 4.2, 2)
    assert "busy" in busy and "idle machine" in busy
    assert demo.timing_note(1, None, None, None) == "speed: one short round"


@pytest.fixture
def fast_backend():
    """One thread and the fast CPU path: the demo's pipeline is under test here, not the kernels."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pruneattn.use_backend("cpu"):
        yield
    torch.set_num_threads(n)


def test_demo_prints_its_timing_and_no_progress_turns_bars_off(tmp_path, monkeypatch, capsys, fast_backend):
    images, labels = datasets.load_sample()
    big = (np.resize(images, (1024, *images.shape[1:])), np.resize(labels, 1024))
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda split: big)  # a "full" set that wants bars
    seen: list[bool] = []
    real = demo.predict
    monkeypatch.setattr(demo, "predict", lambda *a, progress=False, **k: seen.append(progress) or real(*a, **k))
    args = ["--full", "yes", "--quick", "--stats", "var", "--images", "1", "--out", str(tmp_path / "d.png")]
    assert demo.main(args + ["--no-progress"]) == 0
    assert seen and not any(seen)
    out = capsys.readouterr().out
    assert re.search(r"^speed: one short round", out, re.M), out
    seen.clear()
    assert demo.main(args) == 0
    assert any(seen)  # without the flag the full set gets its bars
