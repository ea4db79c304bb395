"""Automatic adapter dispatch, Transformer²'s two passes: `model: "<base>:auto"`.

The first pass runs the base model (no adapter) over the prompt and classifies the mean of its final
hidden states; the second pass is the request itself, with the chosen adapter, or with none when
the prompt belongs to the base's own domain (the class "none"). The classifier is a multinomial
logistic regression on standardised features, fitted when the replica loads on the training split
of each domain: the base export's own data (class "none") and each adapter's fine-tuning data
(its adapter.json's `data_dir`). Prompts come in every length, so each training example is the
mean hidden state of a random-length prefix of a training block.

The choice and the classifier's probabilities go back in each choice's `dispatch` extension field.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

AUTO = "auto"  # the adapter name a request gives to be dispatched
BASE = "none"  # the class of the base's own domain: no adapter


@torch.no_grad()
def prompt_feature(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The first pass: the mean of the base model's final normalised hidden states over the prompt."""
    device = next(model.parameters()).device
    hidden, _ = model.hidden_states(torch.tensor([ids], device=device))
    return hidden[0].float().mean(0).cpu()


@dataclass
class Dispatcher:
    classes: list[str]  # BASE and adapter names
    mean: torch.Tensor  # [D] feature standardisation, from the training features
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """[N, D] (or [D]) features -> [N, C] (or [C]) class probabilities."""
        return (((features - self.mean) / self.std) @ self.weight.T + self.bias).softmax(-1)

    def choose(self, model: torch.nn.Module, ids: list[int]) -> tuple[str | None, dict[str, Any]]:
        """(adapter name or None for the base, the `dispatch` field) for a prompt."""
        t0 = time.perf_counter()
        p = self.probs(prompt_feature(model, ids))
        choice = self.classes[int(p.argmax())]
        info = {"adapter": choice, "probabilities": {c: round(float(x), 4) for c, x in zip(self.classes, p, strict=True)},
                "first_pass_ms": round(1000 * (time.perf_counter() - t0), 3)}
        return (None if choice == BASE else choice), info


def training_blocks(data_dir: str | Path, limit: int) -> np.ndarray:
    """The first `limit` training blocks of a built text dataset ([n, seq_len + 1] token ids)."""
    from pipelines.shards import read_columns, require_manifest

    out = Path(data_dir).expanduser().resolve()
    manifest = require_manifest(out, "`neuraflex-ray data` (dispatch fits its classifier on each domain's training "
                                     "data), or serve without dispatch")
    return read_columns(out, manifest["train_shards"], ("tokens",), limit=limit)["tokens"]


def domain_features(model: torch.nn.Module, blocks: np.ndarray, samples: int, min_len: int,
                    rng: random.Random) -> torch.Tensor:
    """`samples` features, each the mean hidden state of a random-length prefix of a random block."""
    rows = [blocks[rng.randrange(len(blocks))] for _ in range(samples)]
    return torch.stack([prompt_feature(model, [int(t) for t in r[:rng.randint(min_len, len(r))]]) for r in rows])


def fit_dispatcher(model: torch.nn.Module, domains: dict[str, np.ndarray], *, samples: int = 96, min_len: int = 8,
                   l2: float = 1e-3, seed: int = 0) -> Dispatcher:
    """A classifier over `domains` ({class: training blocks}), fitted on the base model's features."""
    if len(domains) < 2:
        raise ValueError(f"dispatch needs at least two domains to choose between, got {sorted(domains)}")
    rng = random.Random(seed)
    classes = sorted(domains)
    feats = [domain_features(model, domains[c], samples, min_len, rng) for c in classes]
    x = torch.cat(feats)
    y = torch.cat([torch.full((len(f),), i) for i, f in enumerate(feats)])
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Dispatcher(classes, mean, std, w.detach(), b.detach())


def fit_for_adapters(model: torch.nn.Module, base_data: str | Path, adapter_data: dict[str, str | Path],
                     blocks: int = 512, **kw: Any) -> Dispatcher:
    """The served LM's dispatcher: its base's training data as BASE, each adapter's as its name."""
    domains = {BASE: training_blocks(base_data, blocks)}
    domains.update({name: training_blocks(d, blocks) for name, d in adapter_data.items()})
    return fit_dispatcher(model, domains, **kw)
