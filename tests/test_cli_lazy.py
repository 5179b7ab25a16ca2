"""The ``t3d`` command starts without the heavy libraries: commands are registered by name and imported on use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from t3d import cli

HEAVY = ("torch", "monai", "transformers")


def loaded_after(code: str) -> dict[str, bool]:
    """Which of ``HEAVY`` a fresh interpreter has imported after running ``code`` (help exits are fine)."""
    probe = f"""
import json, sys
try:
    {code}
except SystemExit:
    pass
print(json.dumps([name in sys.modules for name in {HEAVY!r}]))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return dict(zip(HEAVY, json.loads(out.stdout.strip().splitlines()[-1])))


def test_importing_the_cli_loads_no_torch():
    assert loaded_after("import t3d.cli") == dict.fromkeys(HEAVY, False)


HELP_CALLS = [["--help"], *[[name, "--help"] for name in cli.COMMANDS]]
HELP_CALLS += [["finetune", "seg", "--help"], ["finetune", "cls", "--help"], ["predict", "seg", "--help"]]
HELP_CALLS += [["evaluate", "zeroshot", "--help"], ["evaluate", "retrieval", "--help"]]


@pytest.mark.parametrize("argv", HELP_CALLS, ids=" ".join)
def test_help_loads_no_torch(argv):
    assert loaded_after(f"import t3d.cli; t3d.cli.main({argv!r})") == dict.fromkeys(HEAVY, False)


def test_python_m_t3d_help_runs():
    out = subprocess.run([sys.executable, "-m", "t3d", "--help"], capture_output=True, text=True, check=True)
    assert "pretrain" in out.stdout and "evaluate" in out.stdout


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    listing = capsys.readouterr().out
    for name, (_, help_text) in cli.COMMANDS.items():
        assert name in listing and help_text[:30] in listing


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_registered_module_adds_its_command(name):
    parser = cli.build_parser(name)
    with pytest.raises(SystemExit) as done:
        parser.parse_args([name, "--help"])
    assert done.value.code == 0


def test_command_functions_named_by_string_resolve():
    args = cli.build_parser("evaluate").parse_args(["evaluate", "retrieval", "--checkpoint", "c", "--manifest", "m"])
    assert args.func == "t3d.evaluate.retrieval:command"
    assert callable(cli.resolve(args.func))
