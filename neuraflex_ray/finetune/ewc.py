"""Elastic weight consolidation: fine-tune without forgetting what the base export knew.

The loss gains (ewc_lambda / 2) * sum_i F_i (w_i - w*_i)^2, where w* are the export's weights and F
the diagonal of the Fisher information on the *original* training data, estimated once per export
and stored beside it (`fisher.safetensors`, `fisher.json`): the mean over training sequences of the
squared gradient of that sequence's mean next-token log-likelihood (the empirical Fisher). Weights
the old data leans on (large F) are held near their values; the rest are free to move.

With LoRA the frozen base is w*, so the penalty falls on the adapters' updates A @ B alone. On the
DeepSpeed expert-parallel path each rank penalises the experts it holds, with their slices of F.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FISHER_FILE, FISHER_META = "fisher.safetensors", "fisher.json"


def estimate_fisher(model: nn.Module, blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of a local-layout MoELM over token `blocks` [N, T+1], one sequence at a time."""
    from neuraflex_ray.models.moe_lm import lm_loss

    model.eval()  # no dropout; routing as at inference
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in blocks:
        tokens = torch.from_numpy(np.asarray(row, dtype=np.int64))[None]
        model.zero_grad(set_to_none=True)
        logits, stats = model(tokens[:, :-1])
        lm_loss(logits, tokens[:, 1:], stats, model.cfg).ce.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {n: f / len(blocks) for n, f in fisher.items()}


def fisher_for_export(export_dir: str | Path, data_dir: str | Path, blocks: int) -> dict[str, torch.Tensor]:
    """The export's Fisher on the training split of `data_dir` (its original data), computed once."""
    from safetensors.torch import load_file, save_file

    from neuraflex_ray.atomic import write_json_atomic
    from neuraflex_ray.checkpoint import load_exported

    export_dir = Path(export_dir)
    meta_path = export_dir / FISHER_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["blocks"] >= blocks:
            return load_file(str(export_dir / FISHER_FILE))
    from pipelines.text import load_text_datasets, read_blocks

    train_ds, _, _ = load_text_datasets(str(data_dir))
    rows = read_blocks(train_ds)
    pick = np.random.default_rng(0).choice(len(rows), size=min(blocks, len(rows)), replace=False)
    model, _ = load_exported(export_dir)
    fisher = estimate_fisher(model, rows[np.sort(pick)])
    tmp = export_dir / f".{FISHER_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp))
    tmp.replace(export_dir / FISHER_FILE)
    write_json_atomic(meta_path, {"blocks": int(len(pick)), "data_dir": str(Path(data_dir).resolve()),
                                  "tokens": int(len(pick) * (rows.shape[1] - 1))})
    return fisher


class EWC:
    """The penalty for one (possibly parallelised, possibly LoRA-adapted) model, built once at set-up.

    `fisher` is in the local layout; `local_name(name)` maps this model's parameter names to it and
    `expert_index(name)` gives the global expert id of a DeepSpeed per-expert weight (None otherwise).
    """

    def __init__(self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float,
                 local_name: Any, expert_index: Any):
        from neuraflex_ray.finetune.lora import LORA_SUFFIXES, plain_name

        self.lam = lam
        self.terms: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []  # module, weight, anchor, F
        for full, p in model.named_parameters():
            key = plain_name(full)
            if key.endswith(LORA_SUFFIXES):
                continue
            if ".parametrizations." in full:  # a LoRA-adapted weight: penalise the effective weight
                path, name = key.rsplit(".", 1)
                module = model.get_submodule(path)
            elif p.requires_grad:
                path, name = full.rsplit(".", 1) if "." in full else ("", full)
                module = model.get_submodule(path)
            else:
                continue
            local = local_name(key)
            if local not in fisher:
                continue
            f = fisher[local]
            e = expert_index(key)
            if e is not None:
                f = f[e]
            self.terms.append((module, name, p.detach().clone(), f.to(p.device, p.dtype)))

    def penalty(self) -> torch.Tensor:
        total = sum(((getattr(m, n) - anchor) ** 2 * f).sum() for m, n, anchor, f in self.terms)
        return 0.5 * self.lam * total
