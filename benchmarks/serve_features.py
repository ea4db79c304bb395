"""What the serving features buy on a trained LM export: calibration, quantisation, speculative decoding.

    python benchmarks/serve_features.py [--export runs/quickstart/export] [--draft DIR] [--repeats 3]

All in one process on the export `make quickstart` writes (or --export), side by side:

- calibration: expected calibration error of token confidence (15 bins) on held-out text before and
  after the temperature fitted on the other half of the validation split (eval/calibration.py);
- quant: int8 and int4 weight-only replicas (serving/quantize.py) against fp32: weight bytes,
  held-out bits per byte on the whole validation split, and greedy decode tokens/s at concurrency 1
  (the replica's continuous-batching engine, in process), runs alternated fp32/quantised;
- speculative: prompt lookup (and a draft model with --draft) against plain decoding, greedy, at
  concurrency 1, for completions up to 256 tokens (the model's context permitting); identical text
  is checked and the acceptance rate reported.

Prints one JSON object: {"calibration": {"ece_before", "ece_after", ...}, "quant": {"int8": {"bytes_ratio",
"bpb", "bpb_fp32", "tokens_per_s_ratio"}, "int4": {...}}, "speculative": {"tokens_per_s_ratio",
"acceptance", "identical_greedy", ...}}. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from neuraflex_ray.serving.engine import SamplingParams  # noqa: E402
from neuraflex_ray.serving.models import LMModel, ServeOptions, load_model  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass Config:\n", "    for i in range(len(items)):\n"]


def log(msg: str) -> None:
    print(f"[serve_features] {msg}", file=sys.stderr, flush=True)


async def _greedy(lm: LMModel, prompt: str, max_tokens: int) -> tuple[list[int], float]:
    ids = lm.tokenizer.encode(prompt).ids
    n = min(max_tokens, lm.context - len(ids))
    t = time.perf_counter()
    seq = lm.engine.submit(ids, SamplingParams(max_tokens=n, temperature=0.0))
    out = [tok async for tok in seq.stream()]
    return out, time.perf_counter() - t


def decode_rate(lm: LMModel, max_tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens/s over PROMPTS decoded one after another (concurrency 1), and the token ids."""
    outs, tokens, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        out, dt = asyncio.run(_greedy(lm, prompt, max_tokens))
        outs.append(out)
        tokens, seconds = tokens + len(out), seconds + dt
    return tokens / seconds, outs


def side_by_side(base: LMModel, other: LMModel, max_tokens: int, repeats: int) -> dict[str, Any]:
    """Alternate base/other `repeats` times; the median of each one's tokens/s, and whether the text matched."""
    decode_rate(base, 8), decode_rate(other, 8)  # warm-up: first calls allocate and fill caches
    rates: dict[str, list[float]] = {"base": [], "other": []}
    identical = True
    for _ in range(repeats):
        r_base, out_base = decode_rate(base, max_tokens)
        r_other, out_other = decode_rate(other, max_tokens)
        rates["base"].append(r_base)
        rates["other"].append(r_other)
        identical &= out_base == out_other
    b, o = statistics.median(rates["base"]), statistics.median(rates["other"])
    return {"tokens_per_s_ratio": o / b, "tokens_per_s": o, "tokens_per_s_base": b, "identical_greedy": identical,
            "completion_tokens": [len(x) for x in out_base]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default="runs/quickstart/export")
    p.add_argument("--draft", default="", help="a draft model's export (same tokenizer) for speculative decoding")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    args = p.parse_args()
    export = Path(args.export).resolve()
    if not (export / "model.safetensors").is_file():
        sys.exit(f"--export {export}: no export there; run `make quickstart` first (it writes runs/quickstart/export)")
    torch.set_num_threads(1)  # a replica's share of the machine, and steadier timings
    meta = json.loads((export / "config.json").read_text())
    data_dir = meta["data"]["output_dir"]

    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.eval.calibration import calibrate
    from neuraflex_ray.eval.lm import bits_per_byte, heldout_loss
    from neuraflex_ray.serving.quantize import quantize_model
    from pipelines.text import load_text_datasets, read_blocks

    _, val_ds, manifest = load_text_datasets(data_dir)
    val = read_blocks(val_ds)
    bpt = manifest["val_bytes_per_token"]
    model, _ = load_exported(export)
    log(f"calibration on {len(val)} held-out blocks")
    out: dict[str, Any] = {"export": str(export), "calibration": calibrate(model, val)}

    bpb_fp32 = bits_per_byte(heldout_loss(model, val), bpt)
    base = load_model("base", export, ServeOptions(max_batch_size=1))
    out["quant"] = {}
    for mode in ("int8", "int4"):
        log(f"{mode}: bits per byte and decode speed")
        qmodel, _ = load_exported(export)
        info = quantize_model(qmodel, mode)
        q = load_model(mode, export, ServeOptions(max_batch_size=1, quantize=mode))
        speed = side_by_side(base, q, 128, args.repeats)
        out["quant"][mode] = {"bytes_ratio": info["bytes_ratio"], "bytes": info["bytes"], "bytes_fp32": info["bytes_fp32"],
                              "bpb": bits_per_byte(heldout_loss(qmodel, val), bpt), "bpb_fp32": bpb_fp32,
                              "tokens_per_s_ratio": speed["tokens_per_s_ratio"], "tokens_per_s": speed["tokens_per_s"],
                              "tokens_per_s_fp32": speed["tokens_per_s_base"]}

    log("speculative decoding (prompt lookup) against plain decoding")
    opts = ServeOptions(max_batch_size=1, speculative="ngram", num_speculative_tokens=args.k)
    spec = load_model("spec", export, opts)
    s = side_by_side(base, spec, args.max_tokens, args.repeats)
    report = spec.engine.load()["speculative"]
    out["speculative"] = {**s, "acceptance": report["acceptance_rate"], "tokens_per_step": report["tokens_per_step"],
                          "method": "ngram", "k": args.k}
    if args.draft:
        log("speculative decoding with the draft model")
        opts = ServeOptions.from_args({"max_batch_size": 1, "speculative": "draft", "draft": args.draft,
                                       "num_speculative_tokens": args.k})
        spec = load_model("draft", export, opts)
        s = side_by_side(base, spec, args.max_tokens, args.repeats)
        report = spec.engine.load()["speculative"]
        out["speculative_draft"] = {**s, "acceptance": report["acceptance_rate"],
                                    "tokens_per_step": report["tokens_per_step"], "draft": args.draft}
    out["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
