"""Adapter files (LoRA, SVF), and how an adapted model's parameters are named on disk.

An adapter directory holds `adapter.safetensors` (tensors named `<weight>.lora_A` / `.lora_B`, or
`<weight>.svf_z`, in the local layout) and `adapter.json` (its method, targets, the method's settings
and the base export's fingerprint). The adapters themselves (parametrizations, apply, merge) are
`finetune/lora.py`'s and `finetune/svf.py`'s (`finetune/methods.py` names both); serving reads these
files through `serving/adapters.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.checkpoint.untrusted import refuse_pickles

ADAPTER_FILE, ADAPTER_META = "adapter.safetensors", "adapter.json"
# An adapter parameter's name in its parametrization -> its name on disk, after the weight's (`x.w.lora_A`):
# LoRA's factors A and B (finetune/lora.py), SVF's singular-value scales z (finetune/svf.py).
ADAPTER_PARAMS = {"A": "lora_A", "B": "lora_B", "z": "svf_z"}
ADAPTER_SUFFIXES = tuple(f".{v}" for v in ADAPTER_PARAMS.values())  # an adapter tensor's name ends so


def plain_name(key: str) -> str:
    """A parametrized model's state-dict key as the plain model's: `x.parametrizations.w.original` -> `x.w`,
    and an adapter's `x.parametrizations.w.0.A` -> `x.w.lora_A` (`.0.z` -> `x.w.svf_z`)."""
    if ".parametrizations." not in key:
        return key
    head, tail = key.split(".parametrizations.", 1)
    name, rest = tail.split(".", 1)
    if rest == "original":
        return f"{head}.{name}"
    return f"{head}.{name}.{ADAPTER_PARAMS[rest.rsplit('.', 1)[1]]}"


def fingerprint(export_dir: str | Path) -> str:
    """Identifies a base export by its weights' bytes (sha256 of model.safetensors, 16 hex digits)."""
    h = hashlib.sha256()
    with open(Path(export_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_adapter(state: dict[str, torch.Tensor], meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write adapter.safetensors + adapter.json atomically (the directory appears complete or not at all)."""
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_FILE))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return out


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / ADAPTER_META).read_text())


def read_adapter(adapter_dir: str | Path, base_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of an adapter, refusing one trained on another base (naming both fingerprints)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    refuse_pickles(adapter_dir, "adapter")
    meta = read_adapter_meta(adapter_dir)
    have = fingerprint(base_dir)
    if meta["base_fingerprint"] != have:
        raise ValueError(f"adapter {adapter_dir} was trained on base {meta['base_fingerprint']}, but {base_dir} is "
                         f"base {have}: load it onto the export it was fine-tuned from ({meta.get('base_export')})")
    return meta, load_file(str(adapter_dir / ADAPTER_FILE))
