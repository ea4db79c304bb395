"""The one GPU check: everything this project claims about a GPU, measured in a single run.

    python benchmarks/gpu_suite.py             # on one CUDA GPU, in well under 8 minutes
    python benchmarks/gpu_suite.py --dry-run   # the same code paths, tiny, on CPU (the test suite runs this)

Needs PyTorch alone: no Ray, no network, no dataset (tokens and recordings are random; speed does
not depend on their content). DeepSpeed is used where it is installed and reported absent otherwise.
It measures, in bf16:

- `moe_layer`: our dropless MoE layer (sort by expert + grouped GEMM) against DeepSpeed's `MoE` at
  `drop_tokens=False`, same weights, forward + backward (benchmarks/moe_layer.py's comparison);
- `train_small`: the `small` LM flavour's training step (AdamW, bf16 autocast over fp32 weights),
  eager and with `torch.compile` on each block; MFU against the GPU's datasheet dense bf16 peak
  (and, beside it, against the best bf16 matmul this GPU ran here);
- `neurofm_fsdp`: one FSDP2 training step of the NeuroFM `base` flavour on a single GPU with the
  project's FSDP strategy (bf16 parameters, fp32 reductions);
- `decode_small`: greedy decode tokens/s of the `small` flavour with its KV cache, at batch 1 and 16.

Prints one JSON object on stdout; a section that fails reports {"error": ...} and the rest still run.
The dry run compiles with the `aot_eager` backend (graph capture without a C++ toolchain run);
the GPU run uses the default inductor backend.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layer import compare, init_single_process_group  # noqa: E402

from neuraflex_ray.config import load_config  # noqa: E402
from neuraflex_ray.models.moe_lm import MoELM, flops_per_token, lm_loss  # noqa: E402
from neuraflex_ray.train.compile import compile_blocks  # noqa: E402
from neuraflex_ray.train.metrics import datasheet_bf16_peak  # noqa: E402


@dataclasses.dataclass
class Sizes:
    """What each section runs: the GPU sizes, or the dry run's tiny ones."""

    lm_flavour: str
    vocab: int
    seq_len: int
    train_batch: int
    neuro_flavour: str
    neuro_batch: int
    neuro_channels: dict[str, int]  # modality -> channels per window
    moe: dict[str, int]  # tokens, dim, ffn, experts, top_k
    decode_batches: tuple[int, ...]
    prompt: int
    new_tokens: int
    steps: int  # timed training steps (after warm-up)
    repeats: int  # MoE layer and peak repeats
    compile_backend: str


GPU = Sizes(lm_flavour="small", vocab=32768, seq_len=1024, train_batch=16, neuro_flavour="base", neuro_batch=64,
            neuro_channels={"eeg": 64, "ecg": 2, "resp": 1},
            moe=dict(tokens=16384, dim=512, ffn=1024, experts=8, top_k=2), decode_batches=(1, 16), prompt=128,
            new_tokens=256, steps=10, repeats=10, compile_backend="inductor")
DRY = Sizes(lm_flavour="tiny", vocab=256, seq_len=32, train_batch=2, neuro_flavour="tiny", neuro_batch=4,
            neuro_channels={"eeg": 3, "ecg": 1, "resp": 1},
            moe=dict(tokens=256, dim=32, ffn=64, experts=4, top_k=2), decode_batches=(1, 4), prompt=8,
            new_tokens=8, steps=2, repeats=2, compile_backend="aot_eager")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peaks(device: torch.device, repeats: int) -> dict[str, float]:
    """The datasheet dense bf16 peak (NaN for an unknown part or a CPU) and the best bf16 matmul here."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    datasheet = datasheet_bf16_peak(name)
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = min(timed(lambda: a @ b, device, 2, 1) for _ in range(repeats))
    return {"device_name": name, "datasheet_bf16_flops": datasheet, "measured_bf16_matmul_flops": 2 * n**3 / best}


def lm_config(s: Sizes):
    cfg = load_config(None, [f"model.flavour={s.lm_flavour}"]).model
    return dataclasses.replace(cfg, vocab_size=s.vocab)


def lm_step_seconds(s: Sizes, cfg, device: torch.device, compiled: bool) -> tuple[float, float]:
    """(median step seconds, first step seconds) of AdamW on the LM under bf16 autocast."""
    torch.manual_seed(0)
    model = MoELM(cfg).to(device)
    if compiled:
        compile_blocks(model, s.compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(cfg.vocab_size, (s.train_batch, s.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, stats = model(data[:, :-1])
            loss = lm_loss(logits, data[:, 1:], stats, cfg).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # the first step pays for compilation
    sync(device)
    first = time.perf_counter() - t0
    return timed(step, device, 2, s.steps), first


def train_small(s: Sizes, device: torch.device, peak: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"flavour": s.lm_flavour, "seq_len": s.seq_len, "batch": s.train_batch}
    cfg = lm_config(s)
    tokens = s.train_batch * s.seq_len
    flops = flops_per_token(cfg, s.seq_len) * tokens
    for mode in ("eager", "compiled"):
        sec, first = lm_step_seconds(s, cfg, device, compiled=mode == "compiled")
        out[mode] = {"step_s": sec, "tokens_per_s": tokens / sec, "first_step_s": first,
                     "mfu": flops / sec / peak["datasheet_bf16_flops"],
                     "mfu_vs_measured_matmul": flops / sec / peak["measured_bf16_matmul_flops"]}
    out["compile_speedup"] = out["eager"]["step_s"] / out["compiled"]["step_s"]
    return out


def neurofm_fsdp(s: Sizes, device: torch.device, peak: dict[str, float]) -> dict[str, Any]:
    from neuraflex_ray.models.neurofm import NeuroFM, SeriesInput, neurofm_flops_per_window, param_count
    from neuraflex_ray.models.neurofm_objectives import neurofm_loss
    from neuraflex_ray.train.strategy import FSDPStrategy

    mods = {"eeg": 32, "ecg": 32, "resp": 8}  # samples per patch
    n, horizons = 16, [1, 2, 4]
    on_gpu = device.type == "cuda"
    job = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", f"model.flavour={s.neuro_flavour}",
                             f"train.use_gpu={str(on_gpu).lower()}"])
    cfg = dataclasses.replace(job.model, modalities=list(mods), patch_lens=list(mods.values()), context_patches=n,
                              horizon_patches=horizons, n_channel_ids=128)
    job = dataclasses.replace(job, model=cfg)
    torch.manual_seed(0)
    strategy = FSDPStrategy(job)
    model = strategy.setup(NeuroFM(cfg))
    g = torch.Generator().manual_seed(0)
    b, first_id = s.neuro_batch, 1
    window = {}
    for m, c in s.neuro_channels.items():
        window[m] = SeriesInput(x=torch.randn(b, c, (n + max(horizons)) * mods[m], generator=g).to(device),
                                chan=torch.arange(first_id, first_id + c).expand(b, c).clone().to(device),
                                present=torch.ones(b, dtype=torch.bool, device=device))
        first_id += c
    channels = sum(s.neuro_channels.values())

    def step() -> None:
        loss = neurofm_loss(model, window, cfg, 0, g)
        strategy.backward(loss.total)
        strategy.step(1e-4)

    sec = timed(step, device, 2, s.steps)
    flops = neurofm_flops_per_window(cfg, channels * n, channels=channels) * b
    return {"flavour": s.neuro_flavour, "params": param_count(model), "batch": b, "channels": channels,
            "bf16_params": on_gpu, "step_s": sec, "windows_per_s": b / sec, "patches_per_s": b * channels * n / sec,
            "mfu": flops / sec / peak["datasheet_bf16_flops"]}


@torch.no_grad()
def decode_seconds(model: MoELM, batch: int, s: Sizes, device: torch.device) -> float:
    """Median seconds to prefill a random prompt and decode s.new_tokens greedily, with the KV cache."""
    prompt = torch.randint(model.cfg.vocab_size, (batch, s.prompt), device=device)

    def run() -> None:
        caches = model.new_caches(batch, s.prompt + s.new_tokens)
        logits, _ = model(prompt, caches, 0)
        for pos in range(s.prompt, s.prompt + s.new_tokens):
            logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), caches, pos)

    return timed(run, device, 1, 3)


def decode_small(s: Sizes, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MoELM(lm_config(s)).to(device, torch.bfloat16).eval()
    out: dict[str, Any] = {"flavour": s.lm_flavour, "prompt": s.prompt, "new_tokens": s.new_tokens}
    for batch in s.decode_batches:
        sec = decode_seconds(model, batch, s, device)
        out[f"batch_{batch}"] = {"seconds": sec, "tokens_per_s": batch * s.new_tokens / sec}
    return out


def section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t = time.perf_counter()
    print(f"[gpu_suite] {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = fn()
    except Exception as e:  # one broken section must not cost the others' figures on a rare GPU slot
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results[name]["seconds"] = time.perf_counter() - t
    print(f"[gpu_suite] {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the code paths, measures nothing")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA device; use --dry-run to check the code paths on CPU")
    s = DRY if args.dry_run else GPU
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    results: dict[str, Any] = {"dry_run": args.dry_run, "torch": torch.__version__, "python": platform.python_version()}
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        has_ds = init_single_process_group(device)
        results["deepspeed"] = has_ds
        section(results, "peak", lambda: peaks(device, s.repeats))
        peak = results["peak"]
        section(results, "moe_layer", lambda: compare(**s.moe, repeats=s.repeats, device=device, dtype=torch.bfloat16,
                                                      with_deepspeed=has_ds, with_naive=False))
        section(results, "train_small", lambda: train_small(s, device, peak))
        section(results, "neurofm_fsdp", lambda: neurofm_fsdp(s, device, peak))
        section(results, "decode_small", lambda: decode_small(s, device))
    results["total_seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
