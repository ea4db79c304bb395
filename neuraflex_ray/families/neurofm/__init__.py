"""NeuroFM as a model family: a multimodal foundation model for neural and physiological time series.

Data: the time-series pipeline (`pipelines/timeseries.py`: recordings -> one clock per session ->
normalised windows). Training: FSDP2, one unit per cross-attention and backbone block, with the
curriculum and the training-time augmentations (`augment.py` here). Export: the consolidated
weights and what a server needs to turn raw streams into inputs (modalities, rates, channel ids,
normalisation). Evaluation: forecasting, masked-channel reconstruction and cross-modal retrieval
beside baselines fitted on training windows, and the probes. Serving: /v1/neuro/embed and /forecast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from neuraflex_ray.config import (
    NEUROFM_FLAVOURS,
    Family,
    JobConfig,
    NeuroFMConfig,
    SeriesDataConfig,
    neurofm_for_data,
)
from neuraflex_ray.families.neurofm.task import NeuroTask
from neuraflex_ray.families.neurofm.validate import validate_neurofm

# What a server needs to turn raw streams into model inputs, without the dataset; and what the probe
# (eval/probe_tasks.py) needs to rebuild the pretraining's split: the data config (val_fraction,
# reject_abs_z) and each recording's split_s, to check it against.
EXPORTED_MANIFEST_KEYS = ("modalities", "channel_ids", "n_channel_ids", "context_s", "patch_s", "horizons_s", "hop_s",
                          "context_patches", "horizon_patches", "norm_stats", "data_config", "recordings")


class NeuroFMFamily(Family):
    name = "neurofm"
    model_config = NeuroFMConfig
    data_config = SeriesDataConfig
    flavours = NEUROFM_FLAVOURS
    strategies = ("fsdp",)
    task_class = NeuroTask
    serves = "series"
    serve_name = "neurofm"
    finetune_methods = ("full", "lora")
    lora_targets = ("linear",)  # every nn.Linear (finetune/lora.py)
    flops_convention = "model FLOPs = 3 x forward matmul FLOPs per window"
    interpret_module = "neuraflex_ray.families.neurofm.interpret"  # activations, labels, spliced losses

    def validate(self, cfg: JobConfig, world: int) -> None:
        validate_neurofm(cfg, world)

    # ---- data -------------------------------------------------------------------------------
    def build_data(self, data: SeriesDataConfig, force: bool = False) -> dict[str, Any]:
        from pipelines.timeseries import build_series_dataset

        return build_series_dataset(data, force=force)

    def open_data(self, output_dir: str) -> tuple[Any, Any]:
        from pipelines.timeseries import load_series_datasets

        train_ds, val_ds, _ = load_series_datasets(output_dir)
        return train_ds, val_ds

    def fit_to_data(self, cfg: JobConfig, manifest: dict[str, Any]) -> NeuroFMConfig:
        return neurofm_for_data(cfg.model, manifest)

    # ---- train ------------------------------------------------------------------------------
    def build_model(self, model_cfg: NeuroFMConfig) -> Any:
        from neuraflex_ray.models.neurofm import NeuroFM

        return NeuroFM(model_cfg)

    def shard_units(self, model: Any) -> list[Any]:
        """One FSDP2 unit per cross-attention block and per backbone block."""
        return [*model.cross_blocks, *model.blocks]

    # ---- export and evaluation --------------------------------------------------------------
    def export(self, checkpoint: Path, data_dir: Path, out_dir: Path, metadata: dict[str, Any]) -> Path:
        from neuraflex_ray.checkpoint import export_consolidated

        manifest = json.loads((data_dir / "manifest.json").read_text())
        data = {k: manifest[k] for k in EXPORTED_MANIFEST_KEYS if k in manifest}
        data["output_dir"] = str(data_dir)  # the original data a fine-tune's EWC needs
        return export_consolidated(checkpoint, self.name, out_dir, {**metadata, "data": data})

    def evaluate(self, export_dir: Path, data_dir: Path, seed: int = 0) -> dict[str, Any]:
        from neuraflex_ray.eval.neuro import evaluate_neurofm_export

        return evaluate_neurofm_export(export_dir, data_dir, seed=seed)

    def after_training(self, cfg: JobConfig, result: dict[str, Any], export_dir: Path) -> dict[str, Any]:
        """Held-out evaluation beside baselines, then the probes decoded from frozen embeddings."""
        from neuraflex_ray.eval.probe import format_table, probe

        manifest = result["manifest"]
        ev = self.evaluate(export_dir, Path(cfg.data.output_dir), seed=cfg.train.seed)
        ev["probes"] = probe(export_dir, cache_dir=cfg.data.cache_dir)
        print(format_table(ev["probes"]), flush=True)
        sessions = [{k: r.get(k) for k in ("name", "modalities", "duration_s", "train_windows", "val_windows")}
                    for r in manifest["recordings"]]
        return {
            "pipeline": {"recordings": len(manifest["recordings"]), "modalities": list(manifest["modalities"]),
                         "train_windows": manifest["train_windows"], "val_windows": manifest["val_windows"],
                         "skipped": manifest.get("skipped", []), "sessions": sessions},
            "train": {k: result[k] for k in ("strategy", "workers", "steps", "final_loss", "val_loss", "mfu",
                                             "patches_per_s", "peak_flops_per_worker", "data_wait_frac",
                                             "fwd_bwd_frac", "optimizer_frac", "checkpoint")},
            "eval": ev,
            "export": {"path": str(export_dir)},
        }

    # ---- serving and fine-tuning ------------------------------------------------------------
    # ---- interpretability (families/neurofm/interpret.py) -------------------------------------
    def activation_sites(self, model: Any) -> dict[str, Any]:
        """latents (the final latent tokens; their mean is the embedding), cross_i and backbone_i."""
        from neuraflex_ray.families.neurofm import interpret

        return interpret.activation_sites(model)

    def load_served(self, name: str, path: Path, options: Any) -> Any:
        from neuraflex_ray.serving.models import load_series

        return load_series(name, path, options)

    def finetune_config(self, cfg: JobConfig, export: Path, meta: dict[str, Any]) -> JobConfig:
        """The export's model, and its channel table so the new recordings' channels keep their ids."""
        model = JobConfig.from_dict({"model_type": self.name, "model": meta["model"]}).model
        data = dataclasses.replace(cfg.data, channel_table=dict(meta.get("data", {}).get("channel_ids", {})))
        return dataclasses.replace(cfg, model=model, data=data)

    def fisher_samples(self, data_dir: Path, n: int, rng: Any) -> tuple[Any, Any]:
        from neuraflex_ray.finetune.ewc import neuro_fisher_samples

        return neuro_fisher_samples(data_dir, n, rng)


FAMILY = NeuroFMFamily()
