"""`neuraflex-ray activations | sae | compare`: the interpretability commands (neuraflex_ray/interpret/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from neuraflex_ray.config import ConfigError


def cmd_activations(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.interpret.activations import collect_activations
    from neuraflex_ray.train.driver import ensure_ray

    ensure_ray(None, min_cpus=args.actors)
    return collect_activations(args.export, args.site, args.data, args.out, max_blocks=args.max_blocks,
                               actors=args.actors)


def cmd_sae(args: argparse.Namespace) -> dict[str, Any]:
    """Train -> export -> evaluate + report a TopK SAE on an activations directory: the quickstart of the
    sae family, named after the site (runs/sae-<site>, data/sae-<site>) unless overridden."""
    from neuraflex_ray.cli.commands import DEFAULT_CONFIGS
    from neuraflex_ray.config import load_config
    from neuraflex_ray.train.driver import ensure_ray
    from neuraflex_ray.workflows import quickstart

    try:
        site = json.loads((Path(args.activations) / "manifest.json").read_text())["site"]
    except FileNotFoundError:
        raise ConfigError(f"--activations {args.activations}: no manifest.json there; write it with "
                          f"`neuraflex-ray activations --export DIR --site SITE --out DIR`") from None
    cfg = load_config(args.config or DEFAULT_CONFIGS["sae"], [f"name=sae-{site}", f"data.output_dir=data/sae-{site}",
                                                              f"data.activations={args.activations}", *args.overrides])
    ensure_ray(cfg)
    return quickstart(cfg)


def _as_export(path: str, data: str, scratch: Path) -> Path:
    """An export as is; a training checkpoint (or a run directory: its latest) exported to scratch first."""
    from neuraflex_ray.checkpoint import export_checkpoint
    from neuraflex_ray.train.driver import latest_checkpoint

    p = Path(path).expanduser()
    if (p / "model.safetensors").is_file():
        return p
    ckpt = (p if (p / "train_state.json").is_file() else None) or latest_checkpoint(p)
    if ckpt is None:
        raise ConfigError(f"{path}: neither an export (model.safetensors) nor a training checkpoint or run directory")
    if not data:
        raise ConfigError(f"{path} is a checkpoint: give --data (the dataset it trained on), or compare exports")
    return export_checkpoint(ckpt, data, scratch / f"export-{len(list(scratch.iterdir()))}")


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from neuraflex_ray.checkpoint import read_export_meta
    from neuraflex_ray.interpret.compare import compare_exports

    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        data = args.data
        for p in (args.a, args.b):
            if not data and (Path(p) / "config.json").is_file():
                data = (read_export_meta(p).get("data") or {}).get("output_dir", "")
        a, b = (_as_export(p, data, Path(tmp)) for p in (args.a, args.b))
        out = args.out or f"runs/compare/{Path(args.a).name}-vs-{Path(args.b).name}"
        table = compare_exports(a, b, out, args.site or None, tokens=args.tokens)
    print(open(table["files"][1]).read(), flush=True)
    return {k: table[k] for k in ("a", "b", "tokens", "identify", "files")}


def add_interpret_parser(sub: Any) -> None:
    sp = sub.add_parser("activations", help="An export's activations at one site, by a Ray Data batch-inference job.",
                        description="Writes Parquet shards (activation, block, position and the family's columns) and "
                                    "manifest.json; LM sites: attn_i, ffn_i, resid_i, moe_in_i; NeuroFM sites: "
                                    "latents, backbone_i (neuraflex_ray/interpret/activations.py).")
    sp.add_argument("--export", required=True, help="an LM or NeuroFM export whose training dataset is on disk")
    sp.add_argument("--site", required=True, help="e.g. resid_1 (a wrong name lists the model's sites)")
    sp.add_argument("--data", default="train", help="train | val: which split of the export's own dataset")
    sp.add_argument("--out", required=True, help="the output directory (written whole or not at all)")
    sp.add_argument("--max-blocks", type=int, default=0, help="stop after this many units: token blocks or windows (0: all)")
    sp.add_argument("--actors", type=int, default=2, help="inference actors (one CPU each)")
    sp.set_defaults(fn=cmd_activations)
    sp = sub.add_parser("sae", help="Train, export and evaluate a TopK sparse autoencoder on an activations directory.",
                        description="Ray Train (FSDP2) on the rows, split by token block; evaluation on the held-out "
                                    "blocks (explained variance, L0, dead latents, PCA, spliced CE-loss score, token-kind "
                                    "concepts) and a report in <export>/report (features.md, features.png).")
    sp.add_argument("--activations", required=True, help="the directory `neuraflex-ray activations` wrote")
    sp.add_argument("--config", help="SAE job YAML (default: jobs/configs/sae_debug.yaml)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.k=16 model.expansion=4")
    sp.set_defaults(fn=cmd_sae)
    sp = sub.add_parser("compare", help="How alike two exports (or checkpoints) of a family represent held-out inputs, by site.",
                        description="Debiased linear CKA between every pair of sites (heatmap), and for same-named sites "
                                    "RSA with noise ceilings, Procrustes distance, SVCCA and CCA; writes compare.json, "
                                    "compare.md, compare.png (neuraflex_ray/interpret/compare.py).")
    sp.add_argument("a", help="an export, a training checkpoint or a run directory (its latest checkpoint)")
    sp.add_argument("b", help="the same for the other model (an LM: A's tokenizer; NeuroFM: A's channels)")
    sp.add_argument("--site", action="append", default=[], help="compare only these sites (repeatable; default all)")
    sp.add_argument("--tokens", type=int, default=2048, help="held-out rows compared (LM: tokens; NeuroFM: latent tokens)")
    sp.add_argument("--data", default="", help="the dataset a checkpoint trained on (default: an export's own)")
    sp.add_argument("--out", help="output directory (default runs/compare/<a>-vs-<b>)")
    sp.set_defaults(fn=cmd_compare)
