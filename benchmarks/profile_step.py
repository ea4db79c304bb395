"""Where a training step's time goes on CPU: torch.profiler over the debug flavours' steps, one process.

    python benchmarks/profile_step.py [--models moe neurofm] [--steps 6] [--threads 1]

Each model trains its debug flavour (jobs/configs/*_debug.yaml shapes, random data of the real
shapes) on the local path, with one thread as each Ray Train worker has, AdamW as in training.
No Ray and no process group: this is the per-rank compute; the all-to-all and gradient reductions
of the 2-worker runs are not in it.

Reports per model:
- `phases`: median seconds of forward, backward and the optimizer step, and their shares;
- `forward_by_part`: forward seconds inside attention, the MoE router (routing + its linear), the
  experts (sort, grouped matmul, combine) and the rest, from module hooks;
- `top_ops`: the operators with the most self CPU time over the profiled steps (forward, backward
  and optimizer), from torch.profiler;
- `op_time_frac`: profiled operator time / wall time; the rest is Python and dispatcher overhead.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def lm_case() -> tuple[nn.Module, Callable[[], torch.Tensor], dict[str, type]]:
    from neuraflex_ray.config import load_config
    from neuraflex_ray.models.moe import MoE
    from neuraflex_ray.models.moe_lm import Attention, MoELM, lm_loss

    cfg = load_config(REPO / "jobs" / "configs" / "moe_debug.yaml")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=4096)
    model = MoELM(model_cfg)
    data = torch.randint(4096, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))

    def loss() -> torch.Tensor:
        logits, stats = model(data[:, :-1])
        return lm_loss(logits, data[:, 1:], stats, model_cfg).total

    return model, loss, {"attention": Attention, "moe": MoE}


def neurofm_case() -> tuple[nn.Module, Callable[[], torch.Tensor], dict[str, type]]:
    from neuraflex_ray.config import load_config
    from neuraflex_ray.models.neurofm import NeuroFM, SeriesInput
    from neuraflex_ray.models.neurofm_blocks import CrossBlock
    from neuraflex_ray.models.neurofm_objectives import neurofm_loss

    cfg = load_config(REPO / "jobs" / "configs" / "neurofm_debug.yaml")
    # The debug dataset's shapes (its manifest: 4 s windows of 0.25 s patches at each modality's
    # rate); a window of EEG with ECG and respiration, as the multimodal stage trains on.
    mods = {"eeg": 32, "ecg": 32, "emg": 64, "eda": 4, "resp": 4, "acc": 8, "fmri": 1, "spikes": 10}
    chans = {"eeg": 16, "ecg": 2, "resp": 2}
    n, horizons = 16, [1, 2, 4]
    m = dataclasses.replace(cfg.model, modalities=list(mods), patch_lens=list(mods.values()), context_patches=n,
                            horizon_patches=horizons, n_channel_ids=115)
    model = NeuroFM(m)
    b = cfg.train.micro_batch_size
    g = torch.Generator().manual_seed(0)
    window, first = {}, 1
    for name, c in chans.items():
        window[name] = SeriesInput(x=torch.randn(b, c, (n + max(horizons)) * mods[name], generator=g),
                                   chan=torch.arange(first, first + c).expand(b, c).clone(),
                                   present=torch.ones(b, dtype=torch.bool))
        first += c

    def loss() -> torch.Tensor:
        return neurofm_loss(model, window, m, 0, g).total

    return model, loss, {"cross_attention": CrossBlock}


def forward_by_part(model: nn.Module, loss: Callable[[], torch.Tensor], parts: dict[str, type],
                    steps: int) -> dict[str, float]:
    """Median forward seconds inside each part (outermost module of each type), via module hooks."""
    spent: dict[str, float] = defaultdict(float)
    handles = []
    for name, cls in parts.items():
        for mod in model.modules():
            if isinstance(mod, cls):
                handles.append(mod.register_forward_pre_hook(lambda *_, n=name: spent.__setitem__(f"_{n}", time.perf_counter())))
                handles.append(mod.register_forward_hook(
                    lambda *_, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - spent[f"_{n}"])))
    if "moe" in parts:  # the router inside the MoE layer: its linear and the top-k / balancing logic
        for mod in model.modules():
            if isinstance(mod, parts["moe"]):
                route = mod.route

                def timed_route(x: torch.Tensor, route=route) -> Any:
                    t = time.perf_counter()
                    r = route(x)
                    spent["router"] += time.perf_counter() - t
                    return r

                mod.route = timed_route
    per_step = []
    for _ in range(steps):
        spent.clear()
        t = time.perf_counter()
        with torch.no_grad():
            loss()
        total = time.perf_counter() - t
        row = {k: v for k, v in spent.items() if not k.startswith("_")}
        if "moe" in row:
            row["experts"] = row.pop("moe") - row.get("router", 0.0)
        row["rest"] = total - sum(row.values())
        per_step.append(row)
    for h in handles:
        h.remove()
    return {k: statistics.median(r[k] for r in per_step) for k in per_step[0]}


def profile(case: Callable[[], tuple[nn.Module, Callable[[], torch.Tensor], dict[str, type]]], steps: int) -> dict:
    torch.manual_seed(0)
    model, loss, parts = case()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        out = loss()
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if record:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[k].append(dt)

    for _ in range(2):
        step(False)
    for _ in range(steps):
        step(True)
    phases = {k: statistics.median(v) for k, v in times.items()}
    total = sum(phases.values())

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(False)
    wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    op_time = sum(e.self_cpu_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "phases": {**{f"{k}_s": v for k, v in phases.items()}, **{f"{k}_share": v / total for k, v in phases.items()}},
        "forward_by_part": forward_by_part(model, loss, parts, steps),
        "top_ops": [{"op": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / steps,
                     "share": e.self_cpu_time_total / 1e6 / wall, "calls_per_step": e.count / steps} for e in top],
        "op_time_frac": op_time / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["moe", "neurofm"], choices=["moe", "neurofm"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a Ray Train worker here has 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"moe": lm_case, "neurofm": neurofm_case}
    out: dict[str, Any] = {m: profile(cases[m], args.steps) for m in args.models}
    out["config"] = {"threads": args.threads, "steps": args.steps, "torch": torch.__version__}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
