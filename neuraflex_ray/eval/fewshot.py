"""Few-shot NeuroFM: the probe tasks learned from 1, 5 and 25 labelled windows per class.

For each labelled task of the systole recording (`probe_labels.py`) and each shot count k, `repeats` draws of k train-side
windows per class (seeded) are scored on the whole probe-test side (balanced accuracy) by:

- linear: the frozen-embedding probe of `probe.py` (same classifier), fitted on the 2k windows;
- lora:   LoRA adapters (finetune/lora.py, rank `rank`) on every linear layer of the backbone plus a
          linear head on the embedding, trained with Adam for `steps` full-batch steps on the 2k
          windows; the base export is not changed.

Means over the draws are reported with the counts; the frozen probe on the whole train side
(`probe.py`) is the reference a user compares against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from neuraflex_ray.eval.common import device_of, make_input, plain
from neuraflex_ray.eval.probe import embeddings
from neuraflex_ray.eval.probe_classifier import decode
from neuraflex_ray.eval.probe_labels import SYSTOLE
from neuraflex_ray.eval.probe_tasks import ProbeSession, TaskWindows, all_tasks, load_session

SHOTS = (1, 5, 25)


def _inputs(model: torch.nn.Module, session: ProbeSession, starts: np.ndarray) -> dict[str, Any]:
    b = len(starts)
    return {m: make_input(x, np.tile(session.chan_ids[m], (b, 1)), np.ones(b, bool), device_of(model))
            for m, x in session.cut(starts).items()}


def lora_fewshot(export_dir: str | Path, session: ProbeSession, starts: np.ndarray, y: np.ndarray,
                 test_starts: np.ndarray, test_y: np.ndarray, *, rank: int, steps: int, lr: float, seed: int) -> float:
    """Adapters + a head trained on (starts, y); balanced accuracy on the test windows."""
    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.finetune.lora import apply_lora

    torch.manual_seed(seed)
    model, _ = load_exported(export_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    for part in (model.cross_blocks, model.blocks):
        apply_lora(part, rank, 2.0 * rank, 0.0, ["linear"])
    head = torch.nn.Linear(model.cfg.dim, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    x, target = _inputs(model, session, starts), torch.as_tensor(y, dtype=torch.long)
    weight = torch.tensor([1.0 / max(1, int((y == c).sum())) for c in (0, 1)], dtype=torch.float32)  # balanced
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(model.embed(x)), target, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    preds = []
    with torch.no_grad():
        for lo in range(0, len(test_starts), 64):
            preds.append(head(model.embed(_inputs(model, session, test_starts[lo:lo + 64]))).argmax(-1).numpy())
    return float(balanced_accuracy_score(test_y, np.concatenate(preds)))


def fewshot_task(export_dir: str | Path, session: ProbeSession, task: TaskWindows, *, shots: tuple[int, ...] = SHOTS,
                 repeats: int = 3, rank: int = 4, steps: int = 40, lr: float = 3e-3) -> dict[str, Any]:
    from neuraflex_ray.checkpoint import load_exported

    frozen, _ = load_exported(export_dir)
    test_emb = embeddings(frozen, session, task.starts["test"])
    out: dict[str, Any] = {"n_test": int(len(task.y["test"])), "shots": {}}
    for k in shots:
        rows: dict[str, list[float]] = {"linear": [], "lora": []}
        for r in range(repeats):
            rng = np.random.default_rng(1000 * k + r)
            pick = [rng.choice(np.flatnonzero(task.y["train"] == c), size=k, replace=False)
                    for c in (0, 1) if (task.y["train"] == c).sum() >= k]
            if len(pick) < 2:
                break
            idx = np.sort(np.concatenate(pick))
            starts, y = task.starts["train"][idx], task.y["train"][idx]
            feats = {"train": embeddings(frozen, session, starts), "test": test_emb}
            rows["linear"].append(decode(feats, TaskWindows(task.name, task.classes, task.labels,
                                                            {"train": starts, "test": task.starts["test"]},
                                                            {"train": y, "test": task.y["test"]}, task.rejected,
                                                            task.dropped_at_split))["bacc"])
            rows["lora"].append(lora_fewshot(export_dir, session, starts, y, task.starts["test"], task.y["test"],
                                             rank=rank, steps=steps, lr=lr, seed=r))
        if rows["linear"]:
            out["shots"][str(k)] = {"linear": float(np.mean(rows["linear"])), "lora": float(np.mean(rows["lora"])),
                                    "draws": len(rows["linear"])}
    return out


def fewshot(export_dir: str | Path, *, cache_dir: str = "", shots: tuple[int, ...] = SHOTS, repeats: int = 3,
            rank: int = 4, steps: int = 40) -> dict[str, Any]:
    """{task: {n_test, shots: {k: {linear, lora, draws}}}} for every labelled task of the export's session."""
    import json

    meta = json.loads((Path(export_dir) / "config.json").read_text())
    session = load_session(meta, SYSTOLE, cache_dir)
    return plain({t.name: fewshot_task(export_dir, session, t, shots=shots, repeats=repeats, rank=rank, steps=steps)
                  for t in all_tasks(session)})
