"""`neuraflex-ray activations`: the interpretability commands (neuraflex_ray/interpret/)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_activations(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.interpret.activations import collect_activations
    from neuraflex_ray.train.driver import ensure_ray

    ensure_ray(None, min_cpus=args.actors)
    return collect_activations(args.export, args.site, args.data, args.out, max_blocks=args.max_blocks,
                               actors=args.actors)


def add_interpret_parser(sub: Any) -> None:
    sp = sub.add_parser("activations", help="An LM export's activations at one site, by a Ray Data batch-inference job.",
                        description="Writes Parquet shards (activation, block, position, token) and manifest.json; "
                                    "sites: attn_i, ffn_i, resid_i, moe_in_i (neuraflex_ray/interpret/activations.py).")
    sp.add_argument("--export", required=True, help="an LM export whose training dataset is on disk")
    sp.add_argument("--site", required=True, help="e.g. resid_1 (a wrong name lists the model's sites)")
    sp.add_argument("--data", default="train", help="train | val: which split of the export's own dataset")
    sp.add_argument("--out", required=True, help="the output directory (written whole or not at all)")
    sp.add_argument("--max-blocks", type=int, default=0, help="stop after this many token blocks (0: all)")
    sp.add_argument("--actors", type=int, default=2, help="inference actors (one CPU each)")
    sp.set_defaults(fn=cmd_activations)
