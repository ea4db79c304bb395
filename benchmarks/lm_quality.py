"""Does the MoE beat a dense model of equal active compute, and which router balances best?

    python benchmarks/lm_quality.py [--corpus stdlib|kjv|PATH] [--config jobs/configs/moe_debug.yaml]
                                    [--variants dense softmax_topk aux_free sinkhorn] [key=value ...]

One run, one after another on the same machine: the same dataset (built once), seed, steps and
tokens for every variant. `dense` is `model.num_experts=0` (a SwiGLU of width top_k x expert_ffn_dim
where each MoE layer was, trained with DeepSpeed ZeRO-2 and no expert parallelism); the router
variants set `model.router`. Each is trained on 2 Ray Train workers, exported, and scored on the
whole held-out split in one process (bits per byte); the bigram fitted on the training split is
printed beside them. Load balance is averaged over the progress intervals of the run's last
quarter: `max_load` is the busiest expert's share of assignments (worst layer; 1/E is balanced),
`load_cv` the coefficient of variation of the shares.

Prints one JSON object: {"corpus", "steps", "num_experts", "dense": {"bpb", "active_params",
"tokens_per_s"}, "routers": {name: {"bpb", "max_load", "load_cv", "tokens_per_s", ...}}, ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.config import ModelConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "dense": ["model.num_experts=0", "train.ep_size=1"],
    "softmax_topk": ["model.router=softmax_topk"],
    "aux_free": ["model.router=aux_free"],
    "sinkhorn": ["model.router=sinkhorn"],
}


def last_quarter(history: list[dict[str, Any]], key: str, steps: int) -> float | None:
    vals = [h[key] for h in history if key in h and h["step"] > 0.75 * steps]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="stdlib", help="stdlib, kjv, or a path/glob/URI of text (data.source)")
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "moe_debug.yaml"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--output-dir", default="runs/bench-lm-quality")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = p.parse_args()

    from neuraflex_ray.models.moe_lm import param_counts
    from neuraflex_ray.train.driver import ensure_ray
    from neuraflex_ray.workflows import evaluate_export, train_and_export

    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(args.corpus).stem if "/" in args.corpus else args.corpus).strip("-")
    data = [f"data.source={args.corpus}", f"data.output_dir=data/text-{slug}"]
    out: dict[str, Any] = {"corpus": args.corpus, "config": {"base": args.config, "overrides": args.overrides,
                                                            "machine": platform.platform()},
                           "routers": {}}
    for name in args.variants:
        cfg = load_config(args.config, [*data, *args.overrides, *VARIANTS[name], f"name=lmq-{slug}-{name}",
                                        f"output_dir={args.output_dir}"])
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # progress and console lines; stdout stays pure JSON
            ensure_ray(cfg)
            result, _, export_dir = train_and_export(cfg)
            ev = evaluate_export(export_dir, cfg.data.output_dir)
        steps = result["steps"]
        counts = param_counts(ModelConfig(**result["model_config"]))  # vocab_size filled in from the tokenizer
        row = {"bpb": ev["val_bits_per_byte"], "tokens_per_s": result["tokens_per_s"], "mfu": result["mfu"],
               "active_params": counts["active"], "total_params": counts["total"],
               "wall_s": time.perf_counter() - t0}
        out.update(steps=steps, tokens=steps * cfg.train.micro_batch_size * cfg.train.num_workers * cfg.data.seq_len,
                   bigram_bpb=ev["bigram_bits_per_byte"], val_tokens=ev["val_tokens"])
        if name == "dense":
            out["dense"] = row
        else:
            out["num_experts"] = cfg.model.num_experts
            out["top_k"] = cfg.model.top_k
            row.update(max_load=last_quarter(result["history"], "expert_max_load", steps),
                       load_cv=last_quarter(result["history"], "expert_load_cv", steps),
                       balanced_load=1 / cfg.model.num_experts)
            out["routers"][name] = row
        print(f"[bench] {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
