"""`neuraflex-ray dashboard <sweep dir>`: TensorBoard and optuna-dashboard on one sweep, URLs printed.

A sweep (`neuraflex-ray tune`) keeps one TensorBoard run per trial under <sweep dir>/tensorboard and
its Optuna study in <sweep dir>/optuna.db (or the storage its summary.json names). Both servers run
as child processes of this command, with their output in <sweep dir>/dashboard-*.log, until Ctrl-C.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from neuraflex_ray.config import ConfigError


def sweep_sources(sweep_dir: str | Path) -> tuple[Path, Path, str]:
    """(sweep dir, its TensorBoard directory, its Optuna storage URL); a ConfigError naming what is missing."""
    d = Path(sweep_dir).expanduser().resolve()
    tb = d / "tensorboard"
    summary = d / "summary.json"
    storage = json.loads(summary.read_text()).get("optuna_storage") if summary.is_file() else None
    if storage is None and (d / "optuna.db").is_file():
        storage = f"sqlite:///{d / 'optuna.db'}"
    if not tb.is_dir() or storage is None:
        raise ConfigError(f"dashboard {d}: not a sweep directory (tensorboard/ and optuna.db); pass the directory "
                          f"`neuraflex-ray tune` printed (<output_dir>/<name>, e.g. runs/sweeps/tune-moe-debug)")
    return d, tb, storage


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s; see {log}") from None
            time.sleep(0.5)


def start(sweep_dir: str | Path, host: str = "127.0.0.1", tensorboard_port: int = 6006,
          optuna_port: int = 8080) -> dict[str, Any]:
    """Start both servers; returns {"tensorboard": url, "optuna": url, "processes": [...]} once both answer."""
    d, tb, storage = sweep_sources(sweep_dir)
    bin_dir = Path(sys.executable).parent
    commands = {
        "tensorboard": ([sys.executable, "-m", "tensorboard.main", "--logdir", str(tb), "--host", host,
                         "--port", str(tensorboard_port)], tensorboard_port),
        "optuna": ([str(bin_dir / "optuna-dashboard"), storage, "--host", host, "--port", str(optuna_port)],
                   optuna_port),
    }
    out: dict[str, Any] = {"processes": []}
    for name, (cmd, port) in commands.items():
        log = d / f"dashboard-{name}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        out["processes"].append(proc)
        url = f"http://{host}:{port}"
        try:
            _wait(url, proc, log)
        except Exception:
            stop(out)
            raise
        out[name] = url
    return out


def stop(servers: dict[str, Any]) -> None:
    for proc in servers["processes"]:
        proc.terminate()
    for proc in servers["processes"]:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
