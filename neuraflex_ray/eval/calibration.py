"""Calibrated token confidence for the LM: temperature scaling fitted on held-out text at export.

A token's *confidence* is the probability the model gives its most likely next token; it is
calibrated when, over the tokens reported at confidence c, the top prediction is right a fraction c
of the time. Small LMs trained briefly are usually mis-calibrated, so the export fits one scalar
temperature T (Guo et al., 2017: softmax(logits / T) minimising held-out negative log-likelihood).
T changes no ranking: greedy text and the served log-probs stay those of the raw model; only the
`uncertainty` extension of the Serve API reads confidence and entropy under T.

Half of the validation blocks fit T; the other half measures the expected calibration error
(15 equal-width confidence bins) before and after, so the reported figure is held out from the fit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

BINS = 15


@torch.no_grad()
def heldout_logits(model: torch.nn.Module, blocks: np.ndarray, max_tokens: int = 8192,
                   batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [N, V] (fp32) and targets [N] over at most `max_tokens` positions of `blocks`."""
    model.eval()
    logits, targets, n = [], [], 0
    for i in range(0, len(blocks), batch_size):
        tokens = torch.from_numpy(blocks[i:i + batch_size].astype(np.int64))
        out, _ = model(tokens[:, :-1])
        logits.append(out.flatten(0, 1).float())
        targets.append(tokens[:, 1:].flatten())
        n += targets[-1].numel()
        if n >= max_tokens:
            break
    return torch.cat(logits)[:max_tokens], torch.cat(targets)[:max_tokens]


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """The T minimising held-out NLL. NLL is convex in 1/T (log-sum-exp of a linear function), so a
    golden-section search over 1/T finds its minimum without a learning rate or a stopping rule."""
    g = (math.sqrt(5) - 1) / 2
    a, b = 1 / high, 1 / low
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, targets, 1 / c), nll(logits, targets, 1 / d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, targets, 1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, targets, 1 / d)
    return 2 / (a + b)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                               bins: int = BINS) -> float:
    """Sum over confidence bins of (share of tokens) x |accuracy - mean confidence|."""
    probs = torch.softmax(logits / temperature, dim=-1)
    conf, pred = probs.max(-1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf, edges[1:-1])  # bin index 0..bins-1
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += float(sel.float().mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return ece


def calibrate(model: torch.nn.Module, val_blocks: np.ndarray, max_tokens: int = 16384) -> dict[str, Any]:
    """Fit T on the first half of the validation blocks; measure ECE and NLL on the second half."""
    if len(val_blocks) < 2:  # nothing to hold out: report the raw distribution
        return {"temperature": 1.0, "skipped": f"{len(val_blocks)} validation block(s); calibration needs 2"}
    half = len(val_blocks) // 2
    fit_logits, fit_targets = heldout_logits(model, val_blocks[:half], max_tokens // 2)
    test_logits, test_targets = heldout_logits(model, val_blocks[half:], max_tokens // 2)
    t = fit_temperature(fit_logits, fit_targets)
    return {"temperature": t, "fit_tokens": int(fit_targets.numel()), "eval_tokens": int(test_targets.numel()),
            "ece_before": expected_calibration_error(test_logits, test_targets, 1.0),
            "ece_after": expected_calibration_error(test_logits, test_targets, t),
            "nll_before": nll(test_logits, test_targets, 1.0), "nll_after": nll(test_logits, test_targets, t),
            "bins": BINS}


def calibrate_export(export_dir: Any, data_dir: Any) -> dict[str, Any]:
    """Fit the LM export's confidence temperature on its validation text and store it in config.json;
    Serve reports token confidence under it."""
    from pathlib import Path

    from neuraflex_ray.atomic import write_json_atomic
    from neuraflex_ray.checkpoint import load_exported
    from pipelines.text import load_text_datasets, read_blocks

    model, meta = load_exported(export_dir)
    _, val_ds, _ = load_text_datasets(str(data_dir))
    meta["calibration"] = calibrate(model, read_blocks(val_ds))
    write_json_atomic(Path(export_dir) / "config.json", meta)
    return meta["calibration"]
