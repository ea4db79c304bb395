"""Forward+backward throughput of three MoE executions of the same experts, side by side.

    python benchmarks/moe_layer.py [--tokens 4096 --dim 512 --ffn 1024 --experts 8 --top-k 2]

- dropless:  our local path (sort by expert, grouped matmul via torch._grouped_mm)
- deepspeed: deepspeed.moe.layer.MoE with ep_size=1, same weights, drop_tokens=False: capacity is
             sized to the busiest expert each forward (an all-reduce per layer under EP), no drops
- deepspeed_static_capacity: the same layer with a fixed capacity that can never drop
             (capacity_factor = E/k), as needed when capacity may not depend on the batch
- naive:     a Python loop over experts with boolean masks

Prints one JSON object. Timings are medians over repeats, interleaved so that machine noise
hits all three alike; compare ratios, not absolute numbers, on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuraflex_ray.config import ModelConfig  # noqa: E402
from neuraflex_ray.models.moe import MoE, naive_moe_forward  # noqa: E402


@contextlib.contextmanager
def stdout_to_stderr():
    """DeepSpeed prints set-up chatter on stdout (some from compiled ops); keep stdout pure JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def init_single_process_group(device: torch.device) -> bool:
    """World of one (DeepSpeed's MoE layer wants a process group even at ep_size=1). Returns whether
    DeepSpeed is importable; without it only our own paths are timed."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free port: two benchmarks at once must not collide
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        with stdout_to_stderr():
            import deepspeed  # after the accelerator env var

            from neuraflex_ray.parallel.deepspeed_comm import skip_shm_allreduce

            skip_shm_allreduce()  # a C++ build that only DeepSpeed's inference all-reduce needs
            deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the group created above
    except ImportError:
        return False
    return True


def compare(tokens: int, dim: int, ffn: int, experts: int, top_k: int, repeats: int, device: torch.device,
            dtype: torch.dtype = torch.float32, with_deepspeed: bool = True, with_naive: bool = True) -> dict:
    """Forward+backward of the same experts in each execution; medians over interleaved repeats."""
    torch.manual_seed(0)
    moe = MoE(dim, ffn, experts, top_k).to(device)
    moe.init_weights(0.02, 0.02)
    impls = {"dropless": lambda: moe(x)[0]}
    if with_deepspeed:
        from neuraflex_ray.parallel.deepspeed_moe import DeepSpeedMoE

        common = dict(dim=dim, num_experts=experts, top_k=top_k, expert_ffn_dim=ffn)
        dynamic = ModelConfig(**common, drop_tokens=False)
        static = ModelConfig(**common, drop_tokens=True, capacity_factor=experts / top_k, min_capacity=0)
        with stdout_to_stderr():
            ds, ds_static = (DeepSpeedMoE(moe, c, ep_size=1, ep_rank=0).to(device, dtype) for c in (dynamic, static))
            for m in (ds, ds_static):
                m.ds.set_deepspeed_parallelism()
                for ex in m.ds.deepspeed_moe.experts.deepspeed_experts:
                    ex.skip_padding = False  # DeepSpeed's own cost: every capacity slot computed
        impls["deepspeed"] = lambda: ds(x)[0]
        impls["deepspeed_static_capacity"] = lambda: ds_static(x)[0]
    if with_naive:
        impls["naive"] = lambda: naive_moe_forward(moe, x)
    moe.to(dtype)  # after DeepSpeed copied the fp32 weights
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, dim, device=device, dtype=dtype)
    with torch.no_grad():
        ref = impls["dropless"]()
        max_diff = {k: float((f() - ref).abs().max()) for k, f in impls.items() if k != "dropless"}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def once(fn) -> float:
        sync()
        t = time.perf_counter()
        fn().backward(grad)
        sync()
        return time.perf_counter() - t

    for fn in impls.values():  # warm-up
        once(fn)
    times: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(repeats):
        for k, fn in impls.items():
            times[k].append(once(fn))

    out: dict = {
        "config": {"tokens": tokens, "dim": dim, "ffn": ffn, "experts": experts, "top_k": top_k,
                   "repeats": repeats, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "grouped_mm": hasattr(torch, "_grouped_mm"), "machine": platform.processor() or platform.machine()},
        "max_abs_diff_vs_dropless": max_diff,
    }
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {"tokens_per_s": tokens / med, "median_s": med}
    for k in impls:
        if k != "dropless":
            out[f"speedup_dropless_vs_{k}"] = out["dropless"]["tokens_per_s"] / out[k]["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if not init_single_process_group(device):
        sys.exit("DeepSpeed is not installed: this benchmark compares against its MoE layer")
    out = compare(args.tokens, args.dim, args.ffn, args.experts, args.top_k, args.repeats, device)
    print(json.dumps(out, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
