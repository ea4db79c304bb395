"""Project NEAT's two ways of adapting after training, measured (issue 30).

    python benchmarks/neat_adapt.py [--parts titans svf dispatch] [--steps 500] [--context 1024] [--window 128]
                                    [--base runs/quickstart/export] [--ft-steps 200] [key=value ...]

titans: full attention, window-only attention and window + Titans memory, trained alike on stdlib
        text mixed with planted recall exercises; key-value recall at 1, 2, 4 and 8 windows of
        distance (chance 1/8), held-out bits/byte on long documents, and the memory's tokens/s cost
        (benchmarks/neat_titans.py has the protocol).
svf:    LoRA and SVF fine-tunes of the quickstart's code model on KJV prose, equal steps: trainable share,
        new-corpus and old-corpus bits/byte. dispatch: `<base>:auto` over code (the base), KJV and licence
        texts: routing accuracy on held-out prompts, mixed held-out bits/byte against the best single
        choice, the first pass's latency (benchmarks/neat_dispatch.py has both protocols; dispatch needs svf).

Prints one JSON object shaped {"titans": {"recall": {"distance_windows", "titans", "window", "full",
"chance"}, "long_bpb": {"titans", "window", "full"}, "tokens_per_s_ratio"}, "svf": {"trainable_fraction",
"old_bpb", "new_bpb", "lora_new_bpb", "lora_old_bpb"}, "dispatch": {"accuracy", "auto_mixed_bpb",
"best_single_mixed_bpb"}} (extra keys beside them). Progress to stderr.
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
PARTS = ("titans", "svf", "dispatch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "moe_debug.yaml"))
    p.add_argument("--steps", type=int, default=500, help="training steps of every long-context arm")
    p.add_argument("--context", type=int, default=1024, help="tokens per training and recall row")
    p.add_argument("--window", type=int, default=128, help="model.attn_window of the window and titans arms")
    p.add_argument("--arms", nargs="+", default=["full", "window", "titans"], choices=["full", "window", "titans"],
                   help="the long-context arms to train (all three for the JSON's titans section)")
    p.add_argument("--chunk", type=int, default=64, help="model.memory_chunk of the titans arm")
    p.add_argument("--cases", type=int, default=64, help="recall rows per distance")
    p.add_argument("--recall-docs", type=int, default=600, help="training documents with planted recall exercises")
    p.add_argument("--max-bytes", type=int, default=3_000_000, help="stdlib training text")
    p.add_argument("--base", default="runs/quickstart/export", help="the export svf and dispatch adapt")
    p.add_argument("--ft-steps", type=int, default=200, help="fine-tuning steps of every adapter")
    p.add_argument("--svf-lr", type=float, default=0.0,
                   help="train.lr of the SVF adapters (0: the config's, as LoRA's); scales want more than LoRA")
    p.add_argument("--dispatch-blocks", type=int, default=64, help="held-out blocks per domain for dispatch")
    p.add_argument("--output-dir", default="runs/bench-neat")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every training run")
    args = p.parse_args()
    t0 = time.perf_counter()
    out: dict = {}
    if "titans" in args.parts:
        from neat_titans import run_titans

        out["titans"] = run_titans(args)
    if {"svf", "dispatch"} & set(args.parts):
        from neat_dispatch import run_dispatch, run_svf

        base = Path(args.base).resolve()
        if not (base / "model.safetensors").is_file():
            sys.exit(f"--base {base}: no export there; run `make quickstart` first (it writes runs/quickstart/export)")
        out["svf"], kjv = run_svf(args, base)
        if "dispatch" in args.parts:
            out["dispatch"] = run_dispatch(args, base, kjv)
    out["config"] = {"argv": sys.argv[1:], "machine": platform.platform(), "wall_s": time.perf_counter() - t0}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
