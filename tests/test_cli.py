"""The command line as a user meets it: `python -m neuraflex_ray`, one-line usage and config errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neuraflex_ray.cli import main


def test_python_dash_m_is_the_command_line():
    r = subprocess.run([sys.executable, "-m", "neuraflex_ray", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "finetune" in r.stdout and "dashboard" in r.stdout


@pytest.mark.parametrize("args,name", [(["serve", "--checkpoint", "A", "--checkpoint", "b=B"], "--checkpoint"),
                                       (["train", "--bogus"], "--bogus"),
                                       (["serve"], "--checkpoint")])
def test_a_usage_error_is_one_line_and_exit_2(args, name, capsys):
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors leave through exit(2)
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and name in err[0], err


def test_verbose_shows_the_traceback():
    from neuraflex_ray.config import ConfigError

    with pytest.raises(ConfigError, match="--checkpoint"):  # raised, so Python prints the traceback
        main(["--verbose", "serve", "--checkpoint", "A", "--checkpoint", "b=B"])
