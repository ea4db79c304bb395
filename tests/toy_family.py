"""A model family defined entirely here, outside the package: a tiny MLP forecaster of synthetic series.

It is what a user's own family looks like: config sections, a Ray Data pipeline writing Parquet
shards and a manifest, a model, its Train task, an export and an evaluation beside a baseline fitted
on training data only. A job YAML names it by import path (`model_type: tests.toy_family:FAMILY`),
and `train`, `export` and `eval` run it through the same commands as the built-in families
(tests/test_family_plugin.py). Ray Train workers import it by that path in their own processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuraflex_ray.config import ConfigError, Family, JobConfig
from neuraflex_ray.train.task import StepOutput, Task, global_batches


@dataclass
class ToyModelConfig:
    flavour: str = "debug"
    hidden: int = 32
    context: int = 0  # filled from the dataset's manifest


@dataclass
class ToyDataConfig:
    output_dir: str = "data/toy"
    n_series: int = 32  # sines of random frequency, phase and amplitude, with noise
    length: int = 200  # samples per series; the first 75 % are training windows, the rest held out
    context: int = 8  # samples the model sees; it predicts the next one
    noise: float = 0.05
    seed: int = 0


class ToyForecaster(nn.Module):
    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(cfg.context, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ToyTask(Task):
    unit = "windows"

    def peak_shape(self) -> tuple[int, int, int]:
        return self.cfg.train.micro_batch_size, self.cfg.model.context, self.cfg.model.hidden

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0,
                train: bool = False) -> Iterator[torch.Tensor]:
        for batch in global_batches(ds, micro_bs, world, skip):
            yield torch.from_numpy(np.asarray(batch["data"], dtype=np.float32)[rank * micro_bs:(rank + 1) * micro_bs])

    def fingerprint(self, batch: torch.Tensor) -> int:
        return int(batch[0].abs().sum() * 1e4)

    def step(self, model: Any, batch: torch.Tensor, step: int, device: torch.device, train: bool = True) -> StepOutput:
        batch = batch.to(device)
        loss = torch.nn.functional.mse_loss(model(batch[:, :-1]), batch[:, -1])
        n = batch.shape[0]
        return StepOutput(loss, {}, n, 6.0 * n * sum(p.numel() for p in model.parameters()))


def _windows(cfg: ToyDataConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    t = np.arange(cfg.length)
    split = int(0.75 * cfg.length)
    out: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for _ in range(cfg.n_series):
        freq, phase, amp = rng.uniform(0.02, 0.12), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 2.0)
        series = amp * np.sin(2 * np.pi * freq * t + phase) + cfg.noise * rng.standard_normal(cfg.length)
        for end in range(cfg.context + 1, cfg.length + 1):
            out["train" if end <= split else "val"].append(series[end - cfg.context - 1:end])
    return {split: np.stack(rows).astype(np.float32) for split, rows in out.items()}


class ToyFamily(Family):
    model_config = ToyModelConfig
    data_config = ToyDataConfig
    flavours = {"debug": {}}
    strategies = ("fsdp",)
    task_class = ToyTask

    def validate(self, cfg: JobConfig, world: int) -> None:
        if cfg.model.hidden < 1:
            raise ConfigError(f"model.hidden must be >= 1 (got {cfg.model.hidden})")

    def build_data(self, data: ToyDataConfig, force: bool = False) -> dict[str, Any]:
        """A Ray Data job: the windows of each split written as Parquet shards, then manifest.json."""
        import ray

        out = Path(data.output_dir)
        manifest_path = out / "manifest.json"
        if manifest_path.is_file() and not force:
            return json.loads(manifest_path.read_text())
        arrays = _windows(data)
        shards = {}
        for split, rows in arrays.items():
            rng = np.random.default_rng(data.seed)
            rows = rows[rng.permutation(len(rows))] if split == "train" else rows
            ray.data.from_numpy(rows).write_parquet(str(out / split))
            shards[f"{split}_shards"] = sorted(f"{split}/{p.name}" for p in (out / split).glob("*.parquet"))
        manifest = {"context": data.context, "train_windows": len(arrays["train"]), "val_windows": len(arrays["val"]),
                    **shards}
        manifest_path.write_text(json.dumps(manifest))
        return manifest

    def open_data(self, output_dir: str) -> tuple[Any, Any]:
        import ray

        return (ray.data.read_parquet(str(Path(output_dir) / "train")),
                ray.data.read_parquet(str(Path(output_dir) / "val")))

    def fit_to_data(self, cfg: JobConfig, manifest: dict[str, Any]) -> ToyModelConfig:
        return ToyModelConfig(flavour=cfg.model.flavour, hidden=cfg.model.hidden, context=manifest["context"])

    def build_model(self, model_cfg: ToyModelConfig) -> nn.Module:
        return ToyForecaster(model_cfg)

    def export(self, checkpoint: Path, data_dir: Path, out_dir: Path, metadata: dict[str, Any]) -> Path:
        from neuraflex_ray.checkpoint import export_consolidated

        return export_consolidated(checkpoint, self.name, out_dir, {**metadata, "data": {"output_dir": str(data_dir)}})

    def evaluate(self, export_dir: Path, data_dir: Path) -> dict[str, Any]:
        """Held-out MSE beside two baselines that need no model: the training windows' mean target, and
        persistence (the last sample seen)."""
        import ray

        from neuraflex_ray.checkpoint import load_exported

        model, _ = load_exported(export_dir)
        train, val = (np.concatenate([b["data"] for b in ray.data.read_parquet(str(Path(data_dir) / split))
                                      .iter_batches(batch_size=4096, batch_format="numpy")])
                      for split in ("train", "val"))
        with torch.no_grad():
            pred = model(torch.from_numpy(val[:, :-1])).numpy()
        y = val[:, -1]
        return {"val_mse": float(np.mean((pred - y) ** 2)),
                "train_mean_mse": float(np.mean((train[:, -1].mean() - y) ** 2)),
                "persistence_mse": float(np.mean((val[:, -2] - y) ** 2)),
                "val_windows": len(val)}


FAMILY = ToyFamily()
