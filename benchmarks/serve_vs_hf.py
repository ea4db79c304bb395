"""Our Serve app against transformers' own `generate` on the same weights (issue 32).

    python benchmarks/serve_vs_hf.py [--export runs/quickstart/export] [--max-tokens 64]

1. Exports the quickstart's model with `export --format hf` and loads it with
   `AutoModelForCausalLM.from_pretrained` (no remote code). Checks: max |logits ours - theirs| in fp32 on
   held-out blocks of the export's own dataset, and `--greedy-tokens` greedy tokens from a held-out
   prompt, token for token.
2. Serving, one after the other, on one thread each (our replica has 1 CPU, so Ray gives it one
   OpenMP thread; the HF side runs with torch.set_num_threads(1) in this process), greedy, exactly
   `--max-tokens` new tokens per request (ours: `ignore_eos`; theirs: no eos), prompts of held-out
   text of varied lengths (`--min-prompt`..`--max-prompt` tokens), sent as token ids so both see the
   same tokens:
   - c1: `--c1-requests` requests one at a time. Ours over HTTP with the official `openai` client;
     theirs `generate` with its KV cache on a batch of one.
   - c16: 16 requests arriving at seeded random times over `--spread-s` seconds, the same schedule
     for both. Ours: each request sent at its time to the continuous-batching engine. Theirs: one
     `generate` on the batch of 16 left-padded prompts, started when the last one has arrived (a
     static batch cannot take a request once it runs). Tokens/s = generated tokens / (last answer -
     first arrival); latency = answer - the request's own arrival.
Prints one JSON object with the keys the issue names (and the settings).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.checkpoint import load_exported  # noqa: E402
from neuraflex_ray.families.moe_lm.hf import export_hf  # noqa: E402
from neuraflex_ray.local_ray import start_local_ray  # noqa: E402
from neuraflex_ray.models.moe_lm import generate  # noqa: E402
from neuraflex_ray.serving.deploy import deploy, free_port  # noqa: E402
from pipelines.text import load_text_datasets, read_blocks  # noqa: E402

MODEL = "neuraflex-moe"


def held_out(export: Path) -> np.ndarray:
    """The validation blocks of the dataset the export was trained on."""
    data = json.loads((export / "config.json").read_text())["data"]["output_dir"]
    _, val, _ = load_text_datasets(data)
    return read_blocks(val)


def correctness(ours: torch.nn.Module, hf: Any, blocks: np.ndarray, n_greedy: int) -> dict[str, Any]:
    x = torch.from_numpy(blocks[:8, :-1].astype(np.int64))
    with torch.no_grad():
        diff = float((ours(x)[0] - hf(x).logits).abs().max())
    prompt = blocks[8, :32].tolist()
    theirs = hf_generate(hf, [prompt], n_greedy)[0]
    mine = generate(ours, prompt, n_greedy)
    return {"logits_max_abs_diff": diff, "logits_rows": int(x.numel()), "greedy_identical": mine == theirs,
            "greedy_tokens": n_greedy}


def hf_generate(hf: Any, prompts: list[list[int]], n: int, pad: int = 0) -> list[list[int]]:
    """Greedy, exactly n new tokens per prompt, prompts left-padded into one batch (transformers' way)."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, generation_config=gen)
    return out[:, width:].tolist()


def prompts_of(blocks: np.ndarray, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    rows = rng.choice(np.arange(9, len(blocks)), size=n, replace=len(blocks) - 9 < n)
    return [blocks[r, : int(rng.integers(lo, hi + 1))].tolist() for r in rows]


def ours_request(client: Any, prompt: list[int], n: int) -> int:
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    return reply.usage.completion_tokens


def run_ours(url: str, prompts: list[list[int]], arrivals: list[float] | None, n: int) -> dict[str, Any]:
    """arrivals None: one request at a time; else request i is sent at arrivals[i] s (one thread each)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies, tokens = [0.0] * len(prompts), [0] * len(prompts)
    t0 = time.perf_counter()

    def one(i: int) -> None:
        if arrivals is not None:
            time.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        start = time.perf_counter() if arrivals is None else t0 + arrivals[i]
        tokens[i] = ours_request(client, prompts[i], n)
        latencies[i] = time.perf_counter() - start

    if arrivals is None:
        for i in range(len(prompts)):
            one(i)
    else:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return summary(sum(tokens), time.perf_counter() - t0, latencies)


def run_hf(hf: Any, prompts: list[list[int]], arrivals: list[float] | None, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    if arrivals is None:
        latencies = []
        for p in prompts:
            s = time.perf_counter()
            hf_generate(hf, [p], n)
            latencies.append(time.perf_counter() - s)
    else:  # one static batch, once the last request has arrived
        time.sleep(max(arrivals))
        hf_generate(hf, prompts, n)
        done = time.perf_counter() - t0
        latencies = [done - a for a in arrivals]
    return summary(n * len(prompts), time.perf_counter() - t0, latencies)


def summary(tokens: int, wall: float, latencies: list[float]) -> dict[str, Any]:
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * float(np.median(latencies)), "p90_ms": 1000 * float(np.percentile(latencies, 90))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default="runs/quickstart/export", help="the quickstart's export (make quickstart)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--greedy-tokens", type=int, default=64)
    p.add_argument("--c1-requests", type=int, default=8)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=56, help="prompt + max tokens must fit model.max_seq_len")
    p.add_argument("--spread-s", type=float, default=1.0, help="c16: arrivals over this many seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    export = Path(args.export).resolve()
    if not (export / "model.safetensors").is_file():
        raise SystemExit(f"--export {export}: no export there; run `make quickstart` first")

    from ray import serve
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    # Ray first: reading the held-out blocks is a Ray Data job. Idle while transformers runs.
    start_local_ray(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        hf_dir = export_hf(export, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        ours, _ = load_exported(export)
        blocks = held_out(export)
        result: dict[str, Any] = {"architecture": hf.config.architectures[0], **correctness(ours, hf, blocks,
                                                                                           args.greedy_tokens)}
        c1_prompts = prompts_of(blocks, args.c1_requests, args.min_prompt, args.max_prompt, args.seed)
        c16_prompts = prompts_of(blocks, 16, args.min_prompt, args.max_prompt, args.seed + 1)
        arrivals = sorted(np.random.default_rng(args.seed + 2).uniform(0, args.spread_s, 16).tolist())
        hf_generate(hf, c1_prompts[:1], 4)  # warm-up, both sides
        hf_c1 = run_hf(hf, c1_prompts, None, args.max_tokens)
        hf_c16 = run_hf(hf, c16_prompts, arrivals, args.max_tokens)
        del hf
        ours = {}
        port = free_port(8000)
        for invariant in (True, False):  # the default, and decode steps that compute only the live rows
            url = deploy([str(export)], port=port, max_batch_size=16, batch_invariant=invariant)
            run_ours(url, c1_prompts[:1], None, 4)
            ours[invariant] = (run_ours(url, c1_prompts, None, args.max_tokens),
                               run_ours(url, c16_prompts, arrivals, args.max_tokens))
        serve.shutdown()

    for invariant, suffix in ((True, ""), (False, "_not_invariant")):
        ours_c1, ours_c16 = ours[invariant]
        result["c1" + suffix] = {"ours_tokens_per_s": ours_c1["tokens_per_s"], "hf_tokens_per_s": hf_c1["tokens_per_s"],
                                 "ratio": ours_c1["tokens_per_s"] / hf_c1["tokens_per_s"],
                                 "ours_p50_ms": ours_c1["p50_ms"], "hf_p50_ms": hf_c1["p50_ms"]}
        result["c16" + suffix] = {"ours_tokens_per_s": ours_c16["tokens_per_s"],
                                  "hf_tokens_per_s": hf_c16["tokens_per_s"],
                                  "ratio": ours_c16["tokens_per_s"] / hf_c16["tokens_per_s"],
                                  "ours_p50_ms": ours_c16["p50_ms"], "hf_p50_ms": hf_c16["p50_ms"]}
    result["runs"] = {"ours_c1": ours[True][0], "ours_c16": ours[True][1], "ours_c1_not_invariant": ours[False][0],
                      "ours_c16_not_invariant": ours[False][1], "hf_c1": hf_c1, "hf_c16": hf_c16}
    result["config"] = {"export": str(export), "max_tokens": args.max_tokens, "prompt_tokens": [args.min_prompt,
                        args.max_prompt], "c16_arrivals_s": arrivals, "threads": 1, "dtype": "float32",
                        "ours": "Serve replica, 1 CPU, 16 decode slots; c1/c16: batch-invariant decode (the "
                                "default), *_not_invariant: serve.batch_invariant=false",
                        "hf": "transformers generate, KV cache, one static batch of 16 left-padded prompts"}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "torch": torch.__version__}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
