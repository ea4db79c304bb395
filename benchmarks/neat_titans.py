"""The Titans part of benchmarks/neat_adapt.py: three arms trained alike, scored on long context.

The standard library's .py files are split by a hash of their path: one in ten is held out (the
recall rows' filler and the long documents come from those only). The training corpus is the other
files plus documents with recall exercises planted in their text (eval/long_context.py), so every
arm trains on the same mix of corpus and synthetic recall sequences; evaluation's keys and values
never occur in it. The arms differ only in their attention and memory:

    full     causal attention over the whole context
    window   sliding-window attention (`model.attn_window`)
    titans   the same window plus the Titans memory (`model.memory: titans`, MAG)

Each trains from scratch with the same config, data, seed and steps on Ray Train (DeepSpeed, expert
parallel), then its export is scored in this process.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import torch

HELD_OUT_FILES = 10  # one stdlib file in ten is held out
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib"}
DISTANCES = [1, 2, 4, 8]


def stdlib_split(max_bytes: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of the standard library, about max_bytes of training text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held, size = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if zlib.crc32(str(rel).encode()) % HELD_OUT_FILES == 0:
            held.append(text)
        elif size < max_bytes:
            train.append(text)
            size += len(text.encode())
    return train, held


def write_corpus(out: Path, train: list[str], n_recall_docs: int, window: int) -> Path:
    from neuraflex_ray.eval.long_context import training_documents

    out.mkdir(parents=True, exist_ok=True)
    docs = train + training_documents(train, n_recall_docs, chars_per_window=window * 3, seed=0)
    random.Random(0).shuffle(docs)
    path = out / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def arms(window: int, chunk: int) -> dict[str, list[str]]:
    return {"full": [], "window": [f"model.attn_window={window}"],
            "titans": [f"model.attn_window={window}", "model.memory=titans", f"model.memory_chunk={chunk}"]}


def score(export: Path, data_dir: str, held: list[str], context: int, window: int, n: int) -> dict[str, Any]:
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.eval.long_context import long_document_bpb, recall_accuracy, recall_cases
    from pipelines.text import load_tokenizer

    model, _ = load_exported(export)
    tok = load_tokenizer(data_dir)

    def encode(s: str) -> list[int]:
        return tok.encode(s).ids

    docs = [encode(t) for t in held]
    filler = [t for d in docs for t in d]

    def next_logits(rows: torch.Tensor) -> torch.Tensor:
        return model(rows)[0][:, -1]

    out: dict[str, Any] = {"mean_distance_windows": []}
    for kind in ("kv", "needle"):
        out[kind] = []
        for d in DISTANCES:
            cases = recall_cases(encode, filler, kind=kind, context=context, window=window, distance_windows=d, n=n)
            out[kind].append(recall_accuracy(next_logits, cases))
            if kind == "kv":
                out["mean_distance_windows"].append(float(cases.distance.mean()) / window)
    out["long"] = long_document_bpb(lambda rows: model(rows)[0], docs[:200], tok.decode, context)
    return out


def run_titans(args: Any) -> dict[str, Any]:
    """Train and score the three arms; the JSON's "titans" section (plus details)."""
    from neuraflex_ray.config import load_config
    from neuraflex_ray.train.driver import ensure_ray
    from neuraflex_ray.workflows import train_and_export

    out_dir = Path(args.output_dir).resolve()
    train, held = stdlib_split(args.max_bytes)
    corpus = write_corpus(out_dir / "long-corpus", train, args.recall_docs, args.window)
    common = [f"data.source={corpus}", f"data.output_dir={out_dir / 'data-long'}", f"data.seq_len={args.context}",
              f"model.max_seq_len={args.context}", f"train.max_steps={args.steps}", "train.micro_batch_size=2",
              f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", f"output_dir={out_dir}",
              *args.overrides]
    rows: dict[str, Any] = {}
    for name, extra in arms(args.window, args.chunk).items():
        if name not in args.arms:
            continue
        cfg = load_config(args.config, [*common, *extra, f"name=neat-{name}"])
        with contextlib.redirect_stdout(sys.stderr):
            ensure_ray(cfg)
            result, _, export = train_and_export(cfg)
            rows[name] = score(export, cfg.data.output_dir, held, args.context, args.window, args.cases)
        rows[name]["tokens_per_s"] = result["tokens_per_s"]
        print(f"[neat] {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    if set(rows) != {"full", "window", "titans"}:  # a partial run (--arms): its rows as they are
        return {"arms": rows, "setup": {"context": args.context, "window": args.window, "steps": args.steps}}
    return {
        "recall": {"distance_windows": DISTANCES, **{k: v["kv"] for k, v in rows.items()}, "chance": 1 / 8},
        "needle": {"distance_windows": DISTANCES, **{k: v["needle"] for k, v in rows.items()}, "chance": 1 / 8},
        "mean_distance_windows": rows["titans"]["mean_distance_windows"],
        "long_bpb": {k: v["long"]["bpb"] for k, v in rows.items()},
        "long_documents": rows["titans"]["long"]["documents"],
        "tokens_per_s_ratio": rows["titans"]["tokens_per_s"] / rows["window"]["tokens_per_s"],
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in rows.items()},
        "setup": {"context": args.context, "window": args.window, "memory_chunk": args.chunk, "steps": args.steps,
                  "cases_per_distance": args.cases, "recall_docs": args.recall_docs, "train_files": len(train),
                  "held_out_files": len(held)},
    }
