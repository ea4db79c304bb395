"""`neuraflex-ray datastore build` and `neuraflex-ray eval --datastore`: the retrieval memory's commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from neuraflex_ray.config import ConfigError


def named_dirs(items: list[str], flag: str) -> dict[str, str]:
    """[NAME=]DIR items -> {name: dir}; a bare DIR is named after its folder."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name, item)
        if not name or not path:
            raise ConfigError(f"{flag} {item!r}: expected NAME=DIR or DIR")
        if name in out:
            raise ConfigError(f"{flag}: the name {name!r} is given twice; name each one (NAME=DIR)")
        out[name] = path
    return out


def cmd_datastore_build(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.memory.build import build_datastore
    from neuraflex_ray.memory.config import DatastoreConfig
    from neuraflex_ray.train.driver import ensure_ray

    cfg = DatastoreConfig.from_overrides(args.settings)
    data = {"val_fraction": args.val_fraction, "min_val_documents": args.min_val_documents, "max_bytes": args.max_bytes,
            "seed": args.seed}
    export = Path(args.export)
    if not (export / "model.safetensors").is_file():
        raise ConfigError(f"--export {export}: no model export there (model.safetensors); pass <run dir>/export")
    ensure_ray(None, min_cpus=cfg.actors)
    return build_datastore(export, args.corpus, args.out, cfg, data)


def cmd_datastore_tune(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.train.driver import ensure_ray
    from neuraflex_ray.tune.knn import run_knn_sweep

    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: run at least one trial")
    ensure_ray(None, min_cpus=args.concurrent + 1)
    return run_knn_sweep(args.export, args.datastore, args.out, trials=args.trials, concurrent=args.concurrent)


def knn_eval(export: Path, datastores: list[str], index: str) -> dict[str, Any]:
    from neuraflex_ray.eval.knn_lm import evaluate_with_datastores

    return evaluate_with_datastores(export, named_dirs(datastores, "--datastore"), index=index)


def add_datastore_parser(sub: Any) -> None:
    sp = sub.add_parser("datastore", help="Retrieval memory for an LM export (kNN-LM): build a FAISS datastore.",
                        description="A retrieval memory an LM reads at inference (neuraflex_ray/memory/).")
    verbs = sp.add_subparsers(dest="verb", required=True, parser_class=type(sp))
    b = verbs.add_parser("build", help="Tokenize a corpus, key it with the export on a Ray Data actor pool, write "
                                       "Parquet shards and FAISS indexes (flat, IVF-PQ, HNSW).",
                         description="Keys: the export's final normalised hidden state at every position of the corpus's "
                                     "training split; values: the next token. The export's own corpus keeps its own "
                                     "split (its held-out documents stay out of the datastore).")
    b.add_argument("--export", required=True, help="the LM export whose hidden states are the keys")
    b.add_argument("--corpus", required=True, help="stdlib, kjv, or a file / directory / glob of text")
    b.add_argument("--out", required=True, help="the datastore directory (written whole or not at all)")
    b.add_argument("--val-fraction", type=float, default=0.05, help="documents held out of a new corpus (default 0.05)")
    b.add_argument("--min-val-documents", type=int, default=20,
                   help="hold out at least this many documents of a new corpus (default 20)")
    b.add_argument("--max-bytes", type=int, default=0, help="cap a new corpus at this many bytes (0: none)")
    b.add_argument("--seed", type=int, default=0, help="the document split's seed")
    b.add_argument("settings", nargs="*", metavar="FIELD=VALUE",
                   help="DatastoreConfig fields (neuraflex_ray/memory/config.py), e.g. k=16 dedup_distance=0.01 pq_m=16")
    b.set_defaults(fn=cmd_datastore_build)
    t = verbs.add_parser("tune", help="Ray Tune (OptunaSearch, two objectives) over k, λ, temperature and the index: "
                                      "held-out bits/byte and search milliseconds per token.",
                         description="Trials score half of the held-out documents; the best is then scored on the other "
                                     "half (neuraflex_ray/tune/knn.py). Writes results.csv, study.db, summary.json.")
    t.add_argument("--export", required=True, help="the LM export the datastore was built by")
    t.add_argument("--datastore", required=True, help="the datastore directory")
    t.add_argument("--out", required=True, help="the sweep directory")
    t.add_argument("--trials", type=int, default=24)
    t.add_argument("--concurrent", type=int, default=2, help="trials at once (one CPU each)")
    t.set_defaults(fn=cmd_datastore_tune)
