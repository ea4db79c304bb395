"""The held-out side of a datastore's corpus as the export scores it: keys and target log-probs of every
position, cut by document into a half that fits the gates and a half that reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neuraflex_ray.memory.fit import StoreRows, fit_gates
from neuraflex_ray.memory.store import Datastore

BATCH_ROWS = 16
GATE_FILE = "gate.json"


@torch.no_grad()
def scored_positions(model: torch.nn.Module, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys float32 [q, D], log-prob of each target float64 [q]) over every predicted position of blocks."""
    keys, logp = [], []
    for i in range(0, len(blocks), BATCH_ROWS):
        ids = torch.from_numpy(np.asarray(blocks[i:i + BATCH_ROWS], dtype=np.int64))
        h, _ = model.hidden_states(ids[:, :-1])
        lp = F.log_softmax(model.logits(h).float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        keys.append(h.float().reshape(-1, h.shape[-1]).numpy())
        logp.append(lp.double().reshape(-1).numpy())
    return np.concatenate(keys), np.concatenate(logp)


def document_halves(docs: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, report) boolean masks over positions: the documents shuffled and cut in two."""
    ids = np.unique(docs)
    if len(ids) < 4:
        raise ValueError(f"{len(ids)} held-out documents: fitting and reporting need at least 2 each; hold out more "
                         f"(data.min_val_documents)")
    order = np.random.default_rng(seed).permutation(ids)
    fit_docs = order[: len(ids) // 2]
    fit = np.isin(docs, fit_docs)
    return fit, ~fit


def text_dir(store: Datastore) -> Path:
    text = Path(store.manifest["text"])
    return text if text.is_absolute() else store.path / text


@dataclass
class HeldOut:
    """The held-out positions of a store's corpus: what the export predicts, and where each belongs."""

    val: np.ndarray  # int [n, L] the held-out token blocks
    keys: np.ndarray  # float32 [q, D], q = n * (L - 1)
    lm_target: np.ndarray  # float64 [q] the export's log-prob of each target
    targets: np.ndarray  # int64 [q]
    docs: np.ndarray  # int64 [q] document of each position
    bytes_per_token: float


def held_out(model: torch.nn.Module, store: Datastore) -> HeldOut:
    """The export on every held-out position of the store's corpus (its text dataset's val split)."""
    from pipelines.text import load_text_datasets, read_blocks, target_documents

    _, val_ds, manifest = load_text_datasets(str(text_dir(store)))
    val = read_blocks(val_ds)
    keys, lm_target = scored_positions(model, val)
    return HeldOut(val, keys, lm_target, val[:, 1:].reshape(-1).astype(np.int64),
                   target_documents(val, manifest["eos_id"]).reshape(-1), manifest["val_bytes_per_token"])


def fit_own_gates(model: torch.nn.Module, store: Datastore, seed: int = 0) -> dict[str, Any]:
    """The store's gates fitted on the fitting half of its corpus's held-out documents (what Serve uses
    when a request names the store): {"fixed": Gate, "adaptive": Gate, "fit_documents", "fit_positions"}."""
    h = held_out(model, store)
    fit, _ = document_halves(h.docs, seed)
    rows = StoreRows.of(store.search(h.keys[fit], per_row=False), h.targets[fit])
    gates = {kind: fit_gates(h.lm_target[fit], [rows], kind == "adaptive")[0].as_dict() for kind in ("fixed", "adaptive")}
    return {**gates, "fit_documents": int(len(np.unique(h.docs[fit]))), "fit_positions": int(fit.sum()), "seed": seed}


def write_gates(path: Path, gates: dict[str, Any]) -> None:
    (path / GATE_FILE).write_text(json.dumps(gates, indent=2))
