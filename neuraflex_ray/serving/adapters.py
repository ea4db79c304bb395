"""Adapters (LoRA, SVF) served per request: one replica, one base model, several adapters.

A request picks an adapter with `model: "<base>:<adapter>"` (`/v1/models` lists them). Each targeted
weight of the base gets one `MultiLoRA` parametrization holding every adapter's (A, B) pair and an
`active` switch: the weight read is W (no adapter) or W + scale * A @ B of the active one. An SVF
adapter is such a pair too, of full rank: A = U diag(σ ⊙ (z − 1)), B = Vᵀ, from the base weight's SVD
when the replica loads it (`finetune/methods.py`). The
engine switches per group of rows: a decode step runs one forward per adapter present among the
live requests, each forward at the full batch shape (so a request's tokens depend only on its own
adapter, as batch invariance asks), keeping that adapter's rows. Requests for different adapters
share a replica and its decode steps; they do not share one matmul (that would take per-row
low-rank kernels, as in S-LoRA or Punica).

Adapters are checked against the base by fingerprint when the replica loads them
(checkpoint/adapters.py), so an adapter trained on another export is refused before serving starts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from neuraflex_ray.checkpoint import ADAPTER_FILE, ADAPTER_META, fingerprint
from neuraflex_ray.finetune.methods import adapter_method


class MultiLoRA(nn.Module):
    """w -> w + scale_a * A_a @ B_a for the active adapter a (w itself when none is active)."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.active: str | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        pair = self.pairs.get(self.active) if self.active is not None else None
        if pair is None:
            return w
        a, b, scale = pair
        return w + (scale * (a @ b)).to(w.dtype)


class AdapterSet:
    """The adapters of one served LM, attached to its model."""

    def __init__(self, model: nn.Module, base_export: Path, adapters: dict[str, str], base_print: str = ""):
        from safetensors.torch import load_file

        self.model, self.meta = model, {}
        self.slots: list[MultiLoRA] = []
        self.dispatcher: Any = None  # serving/dispatch.py's, when the replica serves `<base>:auto`
        base_print = base_print or fingerprint(base_export)  # the caller may have hashed the export already
        for name, path in adapters.items():
            path = Path(path).expanduser().resolve()
            meta = json.loads((path / ADAPTER_META).read_text())
            if meta["base_fingerprint"] != base_print:
                raise ValueError(f"adapters.{name}: {path} was trained on base {meta['base_fingerprint']}, but "
                                 f"{base_export} is base {base_print}: serve it with the export it was fine-tuned from")
            state = load_file(str(path / ADAPTER_FILE))
            method = adapter_method(meta.get("method", "lora"))
            per_weight: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in state.items():
                key, part = k.rsplit(".", 1)
                per_weight.setdefault(key, {})[part] = v
            for key, tensors in per_weight.items():
                module_path, weight = key.rsplit(".", 1)
                module = model.get_submodule(module_path)
                base = getattr(module, weight)  # the base weight (no adapter is active while loading)
                a, b, scale = method.served_pair(base, tensors, meta)
                self._slot(module, weight).pairs[name] = (a.to(base.device), b.to(base.device), scale)
            self.meta[name] = {"path": str(path), "method": method.name, "rank": meta.get("rank"),
                               "targets": meta["targets"], "bytes": (path / ADAPTER_FILE).stat().st_size}

    def _slot(self, module: nn.Module, weight: str) -> MultiLoRA:
        if parametrize.is_parametrized(module, weight):
            for p in module.parametrizations[weight]:
                if isinstance(p, MultiLoRA):
                    return p
        slot = MultiLoRA()
        parametrize.register_parametrization(module, weight, slot, unsafe=True)
        self.slots.append(slot)
        return slot

    @contextlib.contextmanager
    def active(self, name: str | None) -> Iterator[None]:
        for s in self.slots:
            s.active = name
        try:
            yield
        finally:
            for s in self.slots:
                s.active = None

    def names(self) -> list[str]:
        return sorted(self.meta)

    def enable_dispatch(self, dispatcher: Any) -> None:
        """Offer `<base>:auto` (serving/dispatch.py): the engine asks `dispatcher` per request."""
        from neuraflex_ray.serving.dispatch import AUTO

        self.dispatcher = dispatcher
        self.meta[AUTO] = {"method": "dispatch", "classes": dispatcher.classes}


def adapter_info(adapters: AdapterSet | None) -> dict[str, Any]:
    return dict(adapters.meta) if adapters is not None else {}
