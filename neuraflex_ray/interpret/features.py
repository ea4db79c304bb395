"""Features people can read: what each SAE latent fires on, measured against the labels we already have
(the LM's token kinds, `eval/token_kinds.py`; NeuroFM's stimulus phases, `eval/probe_labels.py`), beside
the site's raw neurons and random directions.

A direction is a *concept* when it fires on at least `min_firings` held-out tokens and at least
`precision` of those firings are one token kind. An SAE latent fires where its TopK value is > 0 (its
own threshold). A raw neuron or a random direction has no threshold of its own, so it gets the most
generous one we can state: it fires on the held-out tokens where its projection is highest, at the
SAE's mean firing rate and at 1/4, 1/2, 2 and 4 times it, with either sign, and counts as a concept
when any of those ten choices reaches the bar. The SAE's latents get no such choice.

Read back: each latent's top-activating held-out rows, described by their family (an LM's text
around the token, NeuroFM's recording and time), and a report (Markdown + PNG) per SAE (`write_report`).
The labels come from the family too (`Family.activation_labels`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraflex_ray.models.sae import TopKSAE

RATE_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
BATCH = 8192


@dataclass
class LabelledRows:
    """Held-out activation rows of one site with a label per row (an LM's token kind; NeuroFM's
    stimulus phase) and `describe(row)`: where the row came from, for a reader ({"context": text around an
    LM's token, or a window's recording and time}). Rows without a label (kind -1) count for explained
    variance and contexts, not for concepts."""

    activation: np.ndarray  # [n, d] float32
    kind: np.ndarray  # [n] int: index into kinds; -1 = no label
    kinds: tuple[str, ...]
    describe: Callable[[int], dict[str, str]]


def _precision(counts: np.ndarray, min_firings: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per direction (rows of counts [m, kinds]): firings, the top kind, and its share (nan below min)."""
    total = counts.sum(1)
    top = counts.argmax(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total >= min_firings, counts.max(1) / total, np.nan)
    return total, top, share


@torch.no_grad()
def latent_kind_counts(sae: TopKSAE, x: np.ndarray, kind: np.ndarray, n_kinds: int) -> np.ndarray:
    """[n_latents, n_kinds]: how often each latent fires on each kind of token."""
    counts = np.zeros((sae.cfg.n_latents, n_kinds), np.int64)
    for i in range(0, len(x), BATCH):
        values, indices = sae.encode(torch.from_numpy(x[i:i + BATCH]))
        on = (values > 0).numpy()
        rows = np.broadcast_to(kind[i:i + BATCH, None], on.shape)
        np.add.at(counts, (indices.numpy()[on], rows[on]), 1)
    return counts


def direction_concepts(x: np.ndarray, kind: np.ndarray, n_kinds: int, directions: np.ndarray, rate: float,
                       min_firings: int, precision: float) -> tuple[np.ndarray, np.ndarray]:
    """Two bools per direction (columns of directions [d, m]), from one projection and sort: (generous)
    a concept at any firing rate in RATE_MULTIPLES x rate with either sign, the baseline of the module
    docstring; (plain) a concept at the SAE's own rate, positive side, one of the generous choices."""
    centred = x - x.mean(0)
    generous, plain = np.zeros(directions.shape[1], bool), np.zeros(directions.shape[1], bool)

    def n_of(multiple: float) -> int:  # firings at multiple x the SAE's rate
        return min(len(x), max(1, int(round(multiple * rate * len(x)))))

    ns, n_plain = sorted({n_of(r) for r in RATE_MULTIPLES}), n_of(1.0)
    for j0 in range(0, directions.shape[1], 64):
        proj = centred @ directions[:, j0:j0 + 64]
        cols = slice(j0, j0 + proj.shape[1])
        for positive, signed in ((True, proj), (False, -proj)):
            part = np.argpartition(-signed, ns[-1] - 1, axis=0)[:ns[-1]]  # the n_max highest, any order
            top = np.take_along_axis(part, np.argsort(-np.take_along_axis(signed, part, 0), axis=0), 0)
            for n in ns:
                if n < min_firings:
                    continue
                k = kind[top[:n]]  # [n, cols]
                counts = np.stack([(k == c).sum(0) for c in range(n_kinds)], 1)
                hit = counts.max(1) / n >= precision
                generous[cols] |= hit
                if positive and n == n_plain:
                    plain[cols] |= hit
    return generous, plain


def concept_table(sae: TopKSAE, data: LabelledRows, min_firings: int = 20, precision: float = 0.9,
                  seed: int = 0) -> dict[str, Any]:
    """Fractions of SAE latents, raw neurons and random directions that are concepts, and per latent its
    firings, top kind and precision (for the report); over the labelled rows only."""
    labelled = data.kind >= 0
    x, kind = data.activation[labelled], data.kind[labelled]
    counts = latent_kind_counts(sae, x, kind, len(data.kinds))
    firings, top, share = _precision(counts, min_firings)
    latents = np.nan_to_num(share, nan=0.0) >= precision
    rate = float(firings.sum()) / (max(len(x), 1) * sae.cfg.n_latents)  # mean firing rate of a latent
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((d, sae.cfg.n_latents)).astype(np.float32)
    random /= np.linalg.norm(random, axis=0, keepdims=True)
    args = (x, kind, len(data.kinds))
    neurons, neurons_plain = direction_concepts(*args, np.eye(d, dtype=np.float32), rate, min_firings, precision)
    randoms, randoms_plain = direction_concepts(*args, random, rate, min_firings, precision)
    plain = {"concept_neurons_plain": float(neurons_plain.mean()), "concept_random_plain": float(randoms_plain.mean())}
    per_kind = Counter(data.kinds[t] for t in top[latents])
    return {"tokens": len(x), "rows_unlabelled": int((~labelled).sum()), "min_firings": min_firings, "precision": precision,
            "latent_rate": rate, "concept_latents": float(latents.mean()), "concept_neurons": float(neurons.mean()),
            "concept_random": float(randoms.mean()), **plain, "latents_with_min_firings": int((firings >= min_firings).sum()),
            "kind_share": dict(zip(data.kinds, (np.bincount(kind, minlength=len(data.kinds)) / max(len(kind), 1))
                                   .round(4).tolist(), strict=True)),
            "concepts_by_kind": dict(per_kind.most_common()),
            "per_latent": {"firings": firings.tolist(), "top_kind": [data.kinds[t] for t in top],
                           "precision": [None if np.isnan(s) else round(float(s), 4) for s in share]}}


@torch.no_grad()
def top_contexts(sae: TopKSAE, data: LabelledRows, latents: list[int], n: int = 5) -> dict[int, list[dict[str, Any]]]:
    """For each latent, its n highest activations on held-out rows, each with its label and description."""
    best: dict[int, list[tuple[float, int]]] = {j: [] for j in latents}
    for i in range(0, len(data.activation), BATCH):
        dense = sae.dense_latents(torch.from_numpy(data.activation[i:i + BATCH]))[:, latents].numpy()
        for c, j in enumerate(latents):
            rows = np.argsort(-dense[:, c])[:n]
            best[j] += [(float(dense[r, c]), i + int(r)) for r in rows if dense[r, c] > 0]
    return {j: [{"activation": round(value, 3), "kind": data.kinds[data.kind[row]] if data.kind[row] >= 0 else "-",
                 **data.describe(row)}
                for value, row in sorted(cands, reverse=True)[:n]] for j, cands in best.items()}


def _shown(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def write_report(table: dict[str, Any], contexts: dict[int, list[dict[str, Any]]], stats: dict[str, Any],
                 out_dir: Path) -> list[Path]:
    """features.md (the concept fractions, then each shown latent with its kind, precision and contexts)
    and features.png (each kind's share of held-out tokens against its share of concept latents, and the
    latents' precision distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    per = table["per_latent"]
    lines = [f"# Features of the SAE on `{stats.get('site', '?')}`", "",
             f"{stats.get('n_latents')} latents, k = {stats.get('k')}; explained variance "
             f"{stats.get('explained_variance', float('nan')):.3f} on held-out rows.", "",
             f"Concepts (>= {table['min_firings']} held-out firings, >= {table['precision']:.0%} one label), over "
             f"{table['tokens']:,} labelled held-out rows ({table['rows_unlabelled']:,} without a label left out):", "",
             "| directions | fraction that are concepts |", "|---|---|",
             f"| SAE latents | {table['concept_latents']:.3f} |",
             f"| raw neurons (best of 5 firing rates x 2 signs) | {table['concept_neurons']:.3f} |",
             f"| random directions (same) | {table['concept_random']:.3f} |",
             f"| raw neurons (the SAE's firing rate, positive side) | {table['concept_neurons_plain']:.3f} |",
             f"| random directions (same) | {table['concept_random_plain']:.3f} |", "",
             "## Latents and their top-activating held-out rows", ""]
    for j, rows in contexts.items():
        prec = per["precision"][j]
        lines += [f"### latent {j}: {per['top_kind'][j]}, precision "
                  f"{'-' if prec is None else f'{prec:.2f}'} over {per['firings'][j]} firings", "",
                  "| activation | kind | context |", "|---|---|---|"]
        lines += [f"| {r['activation']} | {r['kind']} | "
                  + "; ".join(f"`{_shown(str(v))}`" if k == "context" else f"{k} {_shown(str(v))}"
                              for k, v in r.items() if k not in ("activation", "kind")) + " |" for r in rows]
        lines.append("")
    md = out_dir / "features.md"
    md.write_text("\n".join(lines))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    kinds = list(table["kind_share"])
    n_concepts = max(sum(table["concepts_by_kind"].values()), 1)
    xs = np.arange(len(kinds))
    a.bar(xs - 0.2, [table["kind_share"][k] for k in kinds], 0.4, label="share of held-out rows")
    a.bar(xs + 0.2, [table["concepts_by_kind"].get(k, 0) / n_concepts for k in kinds], 0.4, label="share of concept latents")
    a.set_xticks(xs, kinds, rotation=35, ha="right")
    a.legend(fontsize=8)
    a.set_title("Labels and the latents that detect them")
    b.hist([p for p in per["precision"] if p is not None], bins=20, range=(0, 1))
    b.axvline(table["precision"], color="k", ls="--")
    b.set_xlabel("precision of a latent's top kind")
    b.set_ylabel("latents")
    b.set_title(f"concepts: latents {table['concept_latents']:.2f}, neurons {table['concept_neurons']:.2f}, "
                f"random {table['concept_random']:.2f}", fontsize=9)
    fig.tight_layout()
    png = out_dir / "features.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [md, png]
