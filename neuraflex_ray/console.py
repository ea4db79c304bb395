"""What the terminal shows: our progress lines, warnings that matter and errors; the rest goes to a file.

A training run's terminal used to scroll with library chatter around the progress lines: DeepSpeed's
op-builder lines, Ray Data's execution plans, Train's `Reporting training result` dumps, Ray's
dedup notices, FutureWarnings from torch. All of it reaches the driver by two roads, and both are
filtered here, on the driver, so `ray job logs` (the driver's output) is as clean as a local run:

- lines the workers print, which Ray forwards to the driver: a line is shown when it is one of ours
  (it starts with a tag such as `[train]`, `[eval]`, `[data]`) or reports a failure (a traceback,
  an `...Error`); every line goes to the log file with its process prefix. Forwarded lines are
  printed without Ray's deduplication, so there is no dedup notice and rank 1's lines stay its own.
  Error messages the GCS publishes to the driver (Ray prints them as `(raylet) ...`) pass the same
  filter;
- the driver's own Python logging and warnings: Ray's loggers show WARNING and above (less two
  notices nobody can act on) and write everything to the log file; library warnings go to the file.

`--verbose` on the command line (or NEURAFLEX_VERBOSE=1) leaves Ray's console as it is. The log
file's path is printed once, at start.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, TextIO

VERBOSE_ENV = "NEURAFLEX_VERBOSE"
# Our progress lines start with a lower-case tag: [train] [eval] [data] [tune] [serve] [finetune] ...
OURS = re.compile(r"^\[[a-z_-]+\] ")
# A forwarded line that reports a failure is shown even when it is not ours.
FAILURE = re.compile(r"Traceback \(most recent call last\)|\b(\w+Error|\w*Exception):|\bCRITICAL\b|\bFATAL\b")
# Driver-side notices shown by default that no user of this tool can act on.
NOISE = ("Progress bars disabled", "Token authentication is enabled",
         # Ray Data's notice of a failed task: the command line then prints the error itself, in one line.
         "An exception was raised from a task of operator", "Exception occurred in user code, with the abbreviated")
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")

_installed: dict[str, Any] = {}
_lock = threading.Lock()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def shown(line: str) -> bool:
    """Whether a line forwarded from a Ray worker belongs on the console."""
    return bool(OURS.match(line) or FAILURE.search(line))


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in NOISE)


class _Once(logging.Filter):
    """The log file's handler sits on several loggers; a record that propagates through two of them
    is written once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_neuraflex_logged", False):
            return False
        record._neuraflex_logged = True
        return True


def install(log_path: str | Path) -> Path | None:
    """Filter this driver's logging and warnings (call before ray.init, so that its own notices are
    filtered too); returns the log file, None when verbose. Once per process: later calls keep the
    first log file. After ray.init, `filter_worker_lines()` does the same for forwarded lines."""
    if verbose():
        return None
    with _lock:
        if _installed:
            return _installed["path"]
        path = Path(log_path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
        _installed.update(path=path, file=log)
    _quiet_driver_logging(log)
    _quiet_library_warnings(log)
    print(f"[console] library output goes to {path} (--verbose shows it here)", flush=True)
    return path


def filter_worker_lines() -> None:
    """After ray.init: lines forwarded from Ray's workers go through `shown` (when install() ran)."""
    if _installed and not _installed.get("forwarding"):
        _quiet_forwarded_lines(_installed["file"])
        _installed["forwarding"] = True


def _quiet_forwarded_lines(log: TextIO) -> None:
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    def kept(data: dict[str, Any]) -> dict[str, Any] | None:
        """Every line to the log file; the lines `shown` allows (and tracebacks) back, or None."""
        lines = data.get("lines") or []
        who = data.get("actor_name") or data.get("task_name") or ""
        log.write("".join(f"({who} pid={data.get('pid')}) {line}\n" for line in lines))
        keep, in_traceback = [], False
        for line in lines:
            in_traceback = in_traceback or line.startswith("Traceback (most recent call last)")
            if in_traceback or shown(line):
                keep.append(line)
        return {**data, "lines": keep} if keep else None

    def handle(data: dict[str, Any]) -> None:
        if (data := kept(data)) is not None:
            ray_worker.print_worker_logs(data, sys.stderr if data.get("is_err") else sys.stdout)

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("ray_print_logs", handle)

    # Error messages the GCS publishes to the driver ("(raylet) Task ServeController.graceful_shutdown
    # failed ...", when Serve shuts down) do not pass the dispatcher: Ray prints them with this function.
    printed = ray_worker.print_to_stdstream

    def print_errors(data: dict[str, Any], ignore_prefix: bool) -> None:
        if (data := kept(data)) is not None:
            printed(data, ignore_prefix)

    ray_worker.print_to_stdstream = print_errors


def _quiet_driver_logging(log: TextIO) -> None:
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.addFilter(_Once())

    def quieten(h: logging.Handler) -> None:
        if h is not to_file and not isinstance(h, logging.FileHandler):  # a console handler
            h.addFilter(_Quiet())

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            quieten(h)
        logger.addHandler(to_file)
        # Ray Serve (re)configures its logger when it is imported, after this runs: handlers added
        # later are quietened too, and the file's handler stays on.
        add = logger.addHandler

        def add_handler(h: logging.Handler, add=add, logger=logger) -> None:
            quieten(h)
            add(h)
            if to_file not in logger.handlers:
                add(to_file)

        logger.addHandler = add_handler


def _quiet_library_warnings(log: TextIO) -> None:
    shown_before = warnings.showwarning
    ours = str(Path(__file__).resolve().parent)

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if str(filename).startswith(ours):
            shown_before(message, category, filename, lineno, file, line)
        else:
            log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = showwarning
