"""The command line as a user meets it: `python -m neuraflex_ray`, one-line usage and config errors."""

from __future__ import annotations

import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuraflex_ray", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_is_the_command_line():
    r = cli("--help")
    assert r.returncode == 0 and "finetune" in r.stdout and "serve" in r.stdout


def test_a_usage_error_is_one_line_and_exit_2():
    for args, names in ((("serve", "--checkpoint", "A", "--checkpoint", "b=B"), "--checkpoint"),
                        (("train", "--bogus"), "--bogus"),
                        (("serve",), "--checkpoint")):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and names in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_verbose_shows_the_traceback():
    r = cli("--verbose", "serve", "--checkpoint", "A", "--checkpoint", "b=B")
    assert r.returncode != 0 and "Traceback" in r.stderr and "--checkpoint" in r.stderr
