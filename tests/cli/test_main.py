"""The CLI: help lists subcommands, bad input is one line and exit 1, --debug shows the traceback."""

import subprocess
import sys

import pytest

from harden.cli import SUBCOMMANDS, main
from harden.errors import HardenError


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_data_show_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "show", "digits"]) == 0
    out = capsys.readouterr().out
    assert "1797 images" in out and "1×8×8" in out and "10 classes" in out


def test_bad_spec_is_one_line_and_exit_1() -> None:
    proc = subprocess.run([sys.executable, "-m", "harden", "data", "show", "npz:/no/such.npz"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "harden data: error: npz:/no/such.npz: no such file"
    assert "Traceback" not in proc.stderr


def test_debug_reraises() -> None:
    with pytest.raises(HardenError):
        main(["--debug", "data", "show", "nope"])
