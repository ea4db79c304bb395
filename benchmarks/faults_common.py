"""What every part of benchmarks/fault_suite.py shares: the repository on sys.path, the model name and
request the parts send, a plain HTTP POST that reports a failure as a status instead of raising, and the
base of the parts' client threads. Kept apart from fault_suite.py so that the part modules can import it
without importing the entry point (which imports them).
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # project code importable however the script is started

MODEL = "neuraflex-moe"
BODY = {"model": MODEL, "prompt": "def handler(event, context):", "max_tokens": 8, "temperature": 0}


def post(url: str, body: dict[str, Any], key: str | None = None, timeout: float = 30) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, {}


class ClientThreads:
    """Client threads running `_run(k)` from entering the block until leaving it."""

    def __init__(self, n: int):
        self.results: list[Any] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(n)]

    def _run(self, k: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> ClientThreads:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
