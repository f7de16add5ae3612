"""The ``pruneattn`` command line: help, version, dispatch, and help texts that speak to users."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pruneattn
from pruneattn import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_with_a_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "bench"):
        assert re.search(rf"^\s+{name}\s+\S.{{20,}}$", out, re.M), out
    assert "--version" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pruneattn {pruneattn.__version__}"


def test_commands_resolve_to_modules_with_main():
    import importlib

    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main)


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_command_help_shows_defaults_and_no_planning_words(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "default" in out
    assert not re.search(r"\bissue\s*\d|\bpart\s*\d", out, re.I), out


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_command_help_imports_no_torch(command):
    """``pruneattn COMMAND --help`` answers without importing torch, numpy or triton (seconds otherwise)."""
    code = ("import sys\nfrom pruneattn import cli\n"
            f"try:\n    cli.main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"pruneattn {command}" in res.stdout and res.stdout.splitlines()[-1] == "[]", res.stdout[-500:]
