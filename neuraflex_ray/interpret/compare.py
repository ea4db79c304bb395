"""`neuraflex-ray compare A B`: how alike two exports of one family represent the same held-out inputs,
at every site.

Both models read the same inputs (a fixed sample of rows of A's held-out split: an LM's tokens, B sharing
A's tokenizer; NeuroFM's latent tokens of A's windows, B knowing A's channels), and each site's output
there is one activation matrix [rows, width]. For every pair of sites
(A's site i, B's site j) we take the debiased linear CKA (the heatmap); for sites of the same name, also
RSA with each side's split-half noise ceiling, the Procrustes distance and SVCCA/CCA (similarity.py).

`identify_sites` asks Kornblith et al.'s question: does each site of A match the same-named site of B
best? Chance is 1 / the number of sites.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuraflex_ray.config import ConfigError
from neuraflex_ray.interpret import similarity

TOKENS = 2048  # held-out rows compared (Gram matrices are tokens x tokens)
MEASURES = ("cka", "rsa", "procrustes", "svcca", "cca")


@dataclass(frozen=True)
class Sample:
    """The held-out rows a comparison reads: flat indices `rows` (unit * per + row within the unit) into
    the held-out split of the dataset that `meta` (the first export's config.json) names. A unit is an
    LM's token block (per = its input positions) or a NeuroFM window (per = its latent tokens)."""

    meta: dict[str, Any]
    per: int
    rows: np.ndarray

    @property
    def units(self) -> np.ndarray:
        return np.unique(self.rows // self.per)


def sample_rows(export: str | Path, tokens: int = TOKENS, seed: int = 0) -> Sample:
    """`tokens` rows drawn without replacement from the held-out split of the export's own dataset."""
    from neuraflex_ray.checkpoint import export_family, load_exported, read_export_meta

    meta, family = read_export_meta(export), export_family(export)
    if not (meta.get("data") or {}).get("output_dir"):
        raise ConfigError(f"{export}: its config.json names no dataset; compare reads that dataset's held-out split")
    model, _ = load_exported(export)
    name, site = next(iter(family.activation_sites(model).items()))
    per = len(family.site_outputs(model, {name: site}, meta, "val", np.arange(1))[name])
    n = family.activation_units(Path(export), meta, "val") * per
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(tokens, n), replace=False))
    return Sample(meta, per, rows)


def site_activations(export: str | Path, sample: Sample, sites: list[str] | None = None) -> dict[str, np.ndarray]:
    """{site: [len(sample.rows), width]} of an export (every site of its family when `sites` is None)."""
    from neuraflex_ray.checkpoint import export_family, load_exported
    from neuraflex_ray.interpret.activations import sites_of

    model, _ = load_exported(export)
    family = export_family(export)
    names = sites or list(family.activation_sites(model))
    units = sample.units
    acts = family.site_outputs(model, sites_of(family, model, names), sample.meta, "val", units)
    # rows index the whole split; map them onto the units that were run
    local = np.searchsorted(units, sample.rows // sample.per) * sample.per + sample.rows % sample.per
    return {name: a[local] for name, a in acts.items()}


def pair_measures(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"cka": similarity.linear_cka(x, y), "rsa": similarity.rsa(x, y),
            "rsa_ceiling_a": similarity.rsa_noise_ceiling(x), "rsa_ceiling_b": similarity.rsa_noise_ceiling(y),
            "procrustes": similarity.procrustes_distance(x, y), "svcca": similarity.svcca(x, y),
            "cca": similarity.cca(x, y)}


def compare_activations(a: dict[str, np.ndarray], b: dict[str, np.ndarray], all_measures: bool = True) -> dict[str, Any]:
    """CKA between every site of a and every site of b, and (all_measures) every measure between
    same-named sites."""
    sites_a, sites_b = list(a), list(b)
    cka = similarity.cka_matrix([a[s] for s in sites_a], [b[s] for s in sites_b]).tolist()
    same = [s for s in sites_a if s in b]
    return {"sites_a": sites_a, "sites_b": sites_b, "cka_matrix": cka,
            "sites": {s: pair_measures(a[s], b[s]) for s in same} if all_measures else {}}


def identify_sites(table: dict[str, Any], cca_matrix: list[list[float]] | None = None) -> dict[str, float]:
    """Share of A's sites whose best match in B (highest CKA, or highest mean CCA) has the same name."""
    def accuracy(m: list[list[float]]) -> float:
        best = np.asarray(m).argmax(1)
        return float(np.mean([table["sites_b"][j] == s for s, j in zip(table["sites_a"], best, strict=True)]))

    out = {"cka": accuracy(table["cka_matrix"]), "chance": 1.0 / len(table["sites_b"])}
    if cca_matrix is not None:
        out["cca"] = accuracy(cca_matrix)
    return out


def to_markdown(table: dict[str, Any], a: str, b: str, tokens: int) -> str:
    lines = [f"# {a} vs {b}", "", f"{tokens:,} held-out tokens; debiased linear CKA, RSA (Spearman of RDMs; each "
             "side's split-half noise ceiling), Procrustes distance (centred, unit Frobenius norm: 0 = same shape, "
             "2 at most), SVCCA (99 % variance) and CCA.", "",
             "| site | CKA | RSA | ceiling A | ceiling B | Procrustes | SVCCA | CCA |", "|---|---|---|---|---|---|---|---|"]
    for s, m in table["sites"].items():
        lines.append(f"| {s} | {m['cka']:.3f} | {m['rsa']:.3f} | {m['rsa_ceiling_a']:.3f} | {m['rsa_ceiling_b']:.3f} | "
                     f"{m['procrustes']:.3f} | {m['svcca']:.3f} | {m['cca']:.3f} |")
    ident = table.get("identify")
    if ident:
        lines += ["", f"Site identification (best CKA match has the same name): {ident['cka']:.2f} "
                      f"(chance {ident['chance']:.2f})"]
    return "\n".join(lines) + "\n"


def heatmap(table: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(table["cka_matrix"])
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * m.shape[1], 1.2 + 0.4 * m.shape[0]))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(m.shape[1]), table["sites_b"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]), table["sites_a"], fontsize=8)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    fig.colorbar(im, ax=ax, label="debiased linear CKA")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_exports(a: str | Path, b: str | Path, out_dir: str | Path, sites: list[str] | None = None,
                    tokens: int = TOKENS, seed: int = 0) -> dict[str, Any]:
    """compare.json, compare.md and compare.png (CKA heatmap) in out_dir; returns the table."""
    from neuraflex_ray.checkpoint import export_family

    family = export_family(a)
    if export_family(b).name != family.name:
        raise ConfigError(f"{b}: a {export_family(b).name} export, {a} a {family.name} one; compare two of one family")
    family.check_comparable(Path(a), Path(b))
    sample = sample_rows(a, tokens, seed)
    table = compare_activations(site_activations(a, sample, sites), site_activations(b, sample, sites))
    table.update(a=str(a), b=str(b), tokens=len(sample.rows), identify=identify_sites(table))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(table, indent=2))
    (out / "compare.md").write_text(to_markdown(table, Path(a).name, Path(b).name, len(sample.rows)))
    heatmap(table, out / "compare.png", f"CKA: {a} (rows) vs {b} (columns)")
    table["files"] = [str(out / f) for f in ("compare.json", "compare.md", "compare.png")]
    return table
