"""Project NEAT's two ways of adapting after training, measured (issue 30).

    python benchmarks/neat_adapt.py [--parts titans] [--steps 400] [--context 1024] [--window 128] [key=value ...]

titans: full attention, window-only attention and window + Titans memory, trained alike on stdlib
        text mixed with planted recall exercises; key-value recall at 1, 2, 4 and 8 windows of
        distance (chance 1/8), held-out bits/byte on long documents, and the memory's tokens/s cost
        (benchmarks/neat_titans.py has the protocol).

Prints one JSON object shaped {"titans": {"recall": {"distance_windows", "titans", "window", "full",
"chance"}, "long_bpb": {"titans", "window", "full"}, "tokens_per_s_ratio"}, ...}. Progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
PARTS = ("titans",)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "moe_debug.yaml"))
    p.add_argument("--steps", type=int, default=400, help="training steps of every arm")
    p.add_argument("--context", type=int, default=1024, help="tokens per training and recall row")
    p.add_argument("--window", type=int, default=128, help="model.attn_window of the window and titans arms")
    p.add_argument("--chunk", type=int, default=64, help="model.memory_chunk of the titans arm")
    p.add_argument("--cases", type=int, default=64, help="recall rows per distance")
    p.add_argument("--recall-docs", type=int, default=600, help="training documents with planted recall exercises")
    p.add_argument("--max-bytes", type=int, default=3_000_000, help="stdlib training text")
    p.add_argument("--output-dir", default="runs/bench-neat")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every training run")
    args = p.parse_args()
    t0 = time.perf_counter()
    out: dict = {}
    if "titans" in args.parts:
        from neat_titans import run_titans

        out["titans"] = run_titans(args)
    out["config"] = {"argv": sys.argv[1:], "machine": platform.platform(), "wall_s": time.perf_counter() - t0}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
