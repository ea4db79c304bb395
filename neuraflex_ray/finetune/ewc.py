"""Elastic weight consolidation: fine-tune without forgetting what the base export knew.

The loss gains (ewc_lambda / 2) * sum_i F_i (w_i - w*_i)^2, where w* are the export's weights and F
the diagonal of the Fisher information on the *original* training data, estimated once per export
and stored beside it (`fisher.safetensors`, `fisher.json`): the mean over training samples of the
squared gradient of that sample's training loss (the empirical Fisher). A sample is a token
sequence for the LM (its mean next-token cross entropy) and one window for NeuroFM (its training
objective at the last curriculum stage). Weights the old data leans on (large F) are held near
their values; the rest are free to move.

With LoRA the frozen base is w*, so the penalty falls on the adapters' updates A @ B alone. Each rank
penalises what it holds, and the sum over ranks is the whole penalty: on the DeepSpeed
expert-parallel path its experts, with their slices of F; under FSDP2 its shard of every weight,
with the matching shard of F and of w*. The gradient of a rank's share reaches only that rank's
shard, which is exactly the penalty's gradient, added to the data loss's reduce-scattered mean. With
LoRA under FSDP2 the factors A and B are sharded too: each rank forms its rows of the update from its
rows of A and the whole of B (one small all-gather of B per adapted weight per micro-batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FISHER_FILE, FISHER_META = "fisher.safetensors", "fisher.json"
FINAL_STAGE = 1 << 30  # a step past every curriculum stage: NeuroFM's Fisher is that of its final objective


def lm_sample_loss(model: nn.Module, row: np.ndarray) -> torch.Tensor:
    """One token block [T+1]: its mean next-token cross entropy."""
    from neuraflex_ray.models.moe_lm import lm_loss

    tokens = torch.from_numpy(np.asarray(row, dtype=np.int64))[None]
    logits, stats = model(tokens[:, :-1])
    return lm_loss(logits, tokens[:, 1:], stats, model.cfg).ce


def neuro_sample_loss(model: nn.Module, sample: tuple[int, dict[str, Any]]) -> torch.Tensor:
    """One (seed, window): NeuroFM's training objective on it, its masks drawn from `seed`."""
    from neuraflex_ray.models.neurofm_objectives import neurofm_loss

    seed, window = sample
    return neurofm_loss(model, window, model.cfg, FINAL_STAGE, torch.Generator().manual_seed(seed)).total


def estimate_fisher(model: nn.Module, samples: Iterable[Any],
                    loss_of: Callable[[nn.Module, Any], torch.Tensor] = lm_sample_loss) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of a local-layout model: the mean of each sample's squared gradient."""
    model.eval()  # no dropout; routing as at inference
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for sample in samples:
        model.zero_grad(set_to_none=True)
        loss_of(model, sample).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("estimate_fisher: no samples (the original training split is empty)")
    return {n: f / count for n, f in fisher.items()}


def lm_fisher_samples(data_dir: str | Path, n: int, rng: np.random.Generator) -> tuple[np.ndarray, Callable]:
    """Up to n token blocks of the LM's training split, and the loss of one (its mean cross entropy)."""
    from pipelines.text import load_text_datasets, read_blocks

    rows = read_blocks(load_text_datasets(str(data_dir))[0])
    return rows[np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))], lm_sample_loss


def neuro_fisher_samples(data_dir: str | Path, n: int, rng: np.random.Generator) -> tuple[list[Any], Callable]:
    """Up to n NeuroFM training windows (read with Ray Data, as training reads them), one at a time, each
    with the modalities it holds and the channels they use, and the loss of one."""
    from neuraflex_ray.models.neurofm import window_inputs
    from pipelines.timeseries import SeriesArrays, load_series_datasets, series_batch

    train_ds, _, manifest = load_series_datasets(str(data_dir))
    parts = [series_batch(b, manifest) for b in train_ds.iter_batches(batch_size=1024, batch_format="numpy")]
    if not parts:
        raise ValueError(f"{data_dir}: the original training split is empty, so EWC has no Fisher to estimate")
    arrays = {m: SeriesArrays(*(np.concatenate([getattr(p[m], f) for p in parts]) for f in ("x", "chan", "present")))
              for m in parts[0]}
    rows = len(next(iter(arrays.values())).present)
    out = []
    for i in np.sort(rng.choice(rows, size=min(n, rows), replace=False)):
        # A one-window batch: the modalities this window holds, the channels it uses.
        one = {m: SeriesArrays(a.x[i:i + 1], a.chan[i:i + 1], a.present[i:i + 1]) for m, a in arrays.items()}
        window = window_inputs(one, slice(0, 1))
        if window:
            out.append((int(i), window))
    return out, neuro_sample_loss


def fisher_for_export(export_dir: str | Path, data_dir: str | Path, samples: int) -> dict[str, torch.Tensor]:
    """The export's Fisher on the training split of `data_dir` (its original data), computed once."""
    from safetensors.torch import load_file, save_file

    from neuraflex_ray.atomic import write_json_atomic
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.config import get_family

    export_dir = Path(export_dir)
    meta_path = export_dir / FISHER_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["blocks"] >= samples:
            return load_file(str(export_dir / FISHER_FILE))
    model, meta = load_exported(export_dir)
    picked, loss_of = get_family(meta["model_type"]).fisher_samples(Path(data_dir), samples, np.random.default_rng(0))
    fisher = estimate_fisher(model, picked, loss_of)
    tmp = export_dir / f".{FISHER_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp))
    tmp.replace(export_dir / FISHER_FILE)
    write_json_atomic(meta_path, {"blocks": len(picked), "data_dir": str(Path(data_dir).resolve())})
    return fisher


def _sharded_update(a: Any, b: Any, scale: float) -> Callable[[], torch.Tensor]:
    """This rank's rows of a LoRA update scale * A @ B whose factors FSDP2 shards by rows: its own rows
    of A (the same rows as the base weight's shard) times the whole of B (r rows, gathered). B's gradient
    from each rank is a partial sum, so it goes back through a reduce-scatter onto B's shards, with B's
    own placement: FSDP2 then adds its data gradient to it.

    The factors are the sharded parameters captured at set-up: around forward and backward FSDP2 swaps
    the modules' attributes for gathered copies, and the penalty must reach the shards the optimizer
    holds. Every rank calls this at the same point of every step, so the collectives line up."""
    from torch.distributed.tensor import Partial

    return lambda: scale * (a.to_local() @ b.full_tensor(grad_placements=[Partial()]))


class EWC:
    """The penalty for one (possibly parallelised, possibly LoRA-adapted) model, built once its
    parameters are final (after DeepSpeed's or FSDP2's set-up, before the first step).

    `fisher` is in the local layout; `local_name(name)` maps this model's parameter names to it and
    `expert_index(name)` gives the global expert id of a DeepSpeed per-expert weight (None otherwise).
    """

    def __init__(self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float,
                 local_name: Callable[[str], str], expert_index: Callable[[str], int | None]):
        from torch.distributed.tensor import DTensor, distribute_tensor

        from neuraflex_ray.finetune.lora import ADAPTER_SUFFIXES, plain_name

        self.lam = lam
        self.terms: list[tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]] = []  # weight, anchor, F
        for full, p in model.named_parameters():
            key = plain_name(full)
            if key.endswith(ADAPTER_SUFFIXES):
                continue
            adapted = ".parametrizations." in full
            if not (adapted or p.requires_grad) or local_name(key) not in fisher:
                continue
            f = fisher[local_name(key)].to(p.device, p.dtype)
            e = expert_index(key)
            if e is not None:
                f = f[e]
            if isinstance(p, DTensor):  # an FSDP2 shard: this rank's rows of F and of the anchor
                f = distribute_tensor(f, p.device_mesh, p.placements, src_data_rank=None).to_local()
                if adapted:  # the frozen base is the anchor: the update A @ B alone, in the base's layout
                    path, name = key.rsplit(".", 1)
                    lora = model.get_submodule(path).parametrizations[name][0]
                    self.terms.append((_sharded_update(lora.A, lora.B, lora.scale),
                                       torch.zeros_like(f), f))
                else:
                    self.terms.append((p.to_local, p.to_local().detach().clone(), f))
            elif adapted:  # the effective weight base + A @ B
                path, name = key.rsplit(".", 1)
                module = model.get_submodule(path)
                self.terms.append((lambda m=module, n=name: getattr(m, n), p.detach().clone(), f))  # p: the base
            else:
                self.terms.append((lambda p=p: p, p.detach().clone(), f))

    def penalty(self) -> torch.Tensor:
        """This rank's share of the penalty (the whole penalty without parallelism)."""
        total = sum(((weight() - anchor) ** 2 * f).sum() for weight, anchor, f in self.terms)
        return 0.5 * self.lam * total
