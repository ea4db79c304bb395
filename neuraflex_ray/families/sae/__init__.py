"""A TopK sparse autoencoder as a model family: trained on an LM's activations at one site by the same
Train loop, checkpoints, Tune sweeps and exports as any model (`model_type: sae`).

Data: a `neuraflex-ray activations` directory, split by token block (families/sae/data.py). Model:
models/sae.py. Training: FSDP2 (families/sae/task.py). Evaluation (interpret/sae_eval.py): explained
variance, L0 and dead latents on the held-out rows beside PCA with as many components as the L0,
and the LM's held-out loss with the SAE's reconstruction spliced in at its site (CE-loss score).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from neuraflex_ray.config import ConfigError, Family, JobConfig
from neuraflex_ray.families.sae.data import SAEDataConfig, build_split, held_out, open_split
from neuraflex_ray.families.sae.task import SAETask
from neuraflex_ray.models.sae import SAEConfig

EVAL_ROWS = 600_000  # held-out rows scored (whole blocks; all when fewer)
PCA_ROWS = 50_000  # training rows PCA is fitted on


class SAEFamily(Family):
    model_config = SAEConfig
    data_config = SAEDataConfig
    flavours = {"debug": {}}
    strategies = ("fsdp",)
    task_class = SAETask

    def validate(self, cfg: JobConfig, world: int) -> None:
        m = cfg.model
        if m.expansion < 1 or m.k < 1 or (m.d_in and m.k > m.expansion * m.d_in):
            raise ConfigError(f"model.k={m.k} and model.expansion={m.expansion}: need expansion >= 1 and "
                              f"1 <= k <= expansion * d_in (d_in {m.d_in or 'from the activations'})")
        if not cfg.data.activations:
            raise ConfigError("data.activations: the directory `neuraflex-ray activations` wrote is required")

    def build_data(self, data: SAEDataConfig, force: bool = False) -> dict[str, Any]:
        return build_split(data)

    def open_data(self, output_dir: str) -> tuple[Any, Any]:
        return open_split(output_dir)

    def fit_to_data(self, cfg: JobConfig, manifest: dict[str, Any]) -> SAEConfig:
        if cfg.model.d_in not in (0, manifest["width"]):
            raise ConfigError(f"model.d_in={cfg.model.d_in} but the activations are {manifest['width']} wide; "
                              f"leave d_in at 0")
        return dataclasses.replace(cfg.model, d_in=manifest["width"], init_b_dec=manifest.get("train_mean", []))

    def build_model(self, model_cfg: SAEConfig) -> Any:
        from neuraflex_ray.models.sae import TopKSAE

        return TopKSAE(model_cfg)

    def export(self, checkpoint: Path, data_dir: Path, out_dir: Path, metadata: dict[str, Any]) -> Path:
        from neuraflex_ray.checkpoint import export_consolidated

        manifest = json.loads((data_dir / "manifest.json").read_text())
        return export_consolidated(checkpoint, self.name, out_dir, {
            **metadata, "data": {"output_dir": str(data_dir)},
            "activations": {k: manifest[k] for k in ("activations", "export", "site", "width")}})

    def evaluate(self, export_dir: Path, data_dir: Path) -> dict[str, Any]:
        from neuraflex_ray.checkpoint import load_exported
        from neuraflex_ray.interpret.features import concept_table
        from neuraflex_ray.interpret.sae_eval import pca_explained_variance, sae_stats

        sae, meta = load_exported(export_dir)
        held = held_out_rows(data_dir)
        stats = sae_stats(sae, held.activation)
        components = max(1, round(stats["l0"]))
        train_ds, _ = open_split(str(data_dir))
        out = {**stats, "site": meta["activations"]["site"], "d_in": sae.cfg.d_in, "n_latents": sae.cfg.n_latents,
               "k": sae.cfg.k, "pca_components": components,
               "pca_explained_variance": pca_explained_variance(_rows(train_ds, PCA_ROWS), held.activation, components)}
        concepts = concept_table(sae, held)
        out.update({k: v for k, v in concepts.items() if k.startswith("concept_")})
        out = {**out, **_spliced_loss(sae, meta["activations"])}
        out["report"] = [str(p) for p in _report(sae, meta, held, concepts, out, Path(export_dir) / "report")]
        return out


def held_out_rows(data_dir: Path, limit: int = EVAL_ROWS) -> Any:
    """The activation rows the SAE never trained on (whole units), labelled and described by the family
    of the model they came from: read from the activations directory through the split's block hash."""
    from neuraflex_ray.checkpoint import export_family, read_export_meta
    from neuraflex_ray.interpret.activations import read_activations

    split = json.loads((Path(data_dir) / "manifest.json").read_text())
    acts = read_activations(split["activations"])
    keep = held_out(acts["block"], split["val_fraction"], split["seed"])
    blocks = np.unique(acts["block"][keep])[:max(1, limit // (int(acts["position"].max()) + 1))]
    keep &= np.isin(acts["block"], blocks)
    export = Path(split["export"])
    return export_family(export).activation_labels(export, read_export_meta(export), {k: v[keep] for k, v in acts.items()})


def _report(sae: Any, meta: dict[str, Any], held: Any, concepts: dict[str, Any], evaluation: dict[str, Any],
            out_dir: Path, shown: int = 24) -> list[Path]:
    """features.{md,png} and concepts.json: the concept fractions, and the most-firing concept latents (half
    of `shown`), then the most-firing others, each with its top-activating held-out contexts."""
    from neuraflex_ray.interpret.features import top_contexts, write_report

    per = concepts["per_latent"]
    by_firing = sorted(range(len(per["firings"])), key=lambda j: -per["firings"][j])
    concept = [j for j in by_firing if (per["precision"][j] or 0) >= concepts["precision"]]
    latents = (concept[:shown // 2] + [j for j in by_firing if j not in concept])[:shown]
    contexts = top_contexts(sae, held, latents)
    paths = write_report(concepts, contexts, evaluation, out_dir)
    (out_dir / "concepts.json").write_text(json.dumps(concepts))
    return [*paths, out_dir / "concepts.json"]


def _rows(ds: Any, limit: int) -> np.ndarray:
    from pipelines.shards import column

    parts, n = [], 0
    for batch in ds.iter_batches(batch_size=8192, batch_format="numpy"):
        parts.append(column(batch, "activation").astype(np.float32))
        n += len(parts[-1])
        if n >= limit:
            break
    return np.concatenate(parts)[:limit]


def _spliced_loss(sae: Any, acts: dict[str, Any]) -> dict[str, Any]:
    """The model's held-out losses (its family's: an LM's cross entropy, NeuroFM's masked reconstruction
    and forecast) clean, with the SAE spliced in at its site, and with the site zeroed."""
    from neuraflex_ray.checkpoint import export_family, load_exported
    from neuraflex_ray.interpret.sae_eval import spliced_loss_score

    model, meta = load_exported(acts["export"])
    family = export_family(acts["export"])
    site = family.activation_sites(model)[acts["site"]]
    out: dict[str, Any] = {}
    for name, loss_of in family.spliced_losses(model, meta).items():
        out.update(spliced_loss_score(loss_of, site, sae, name))
    return out


FAMILY = SAEFamily()
