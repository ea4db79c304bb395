"""What the byte data decides about the model before training: the entropy threshold and the measured
mean patch size.

With `model.patching: entropy` and `model.threshold: 0`, the threshold is fitted on the first
FIT_BLOCKS training blocks so that patches average `model.patch_size` bytes (bisection: the mean is
monotone in the threshold). Whatever the mode, the mean patch size is then measured over the whole
training split under the final rule and recorded in the model section (`mean_patch_bytes`), so the
checkpoint, the export and the run's summary all carry it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.config import ConfigError, JobConfig
from neuraflex_ray.config.blt import BLTConfig
from neuraflex_ray.models.blt import starts_of
from neuraflex_ray.models.blt_patching import fit_threshold, mean_patch_bytes
from pipelines.shards import read_columns

FIT_BLOCKS = 1024


def fit_patching(cfg: JobConfig, manifest: dict[str, Any]) -> BLTConfig:
    m, d = cfg.model, cfg.data
    if manifest["block_bytes"] != d.block_bytes:
        raise ConfigError(f"data.block_bytes={d.block_bytes} but the dataset in {d.output_dir} was built with "
                          f"{manifest['block_bytes']}; rebuild it or use another data.output_dir")
    entropy = m.patching == "entropy"
    if entropy and not manifest["entropy_model"]:
        raise ConfigError(f"model.patching=entropy but the dataset in {d.output_dir} has no entropies; set "
                          f"data.entropy_model (train, or an export) and build it again")
    train = read_columns(Path(d.output_dir), manifest["train_shards"], ("bytes", "entropy") if entropy else ("bytes",))
    if entropy and m.threshold == 0:
        sample = torch.from_numpy(train["entropy"][:FIT_BLOCKS]).float()
        m = dataclasses.replace(m, threshold=fit_threshold(sample, m.patch_size, monotonic=m.monotonic,
                                                           min_bytes=m.min_patch_bytes))
    measured = mean_patch_bytes(starts_of(m, train["bytes"], train.get("entropy")))
    rule = f"{'monotonic ' if m.monotonic else ''}threshold {m.threshold:.4f}" if entropy else f"target {m.patch_size:g}"
    print(f"[patching] {m.patching} ({rule}): {measured:.2f} bytes per patch on the {len(train['bytes'])} training "
          f"blocks", flush=True)
    return dataclasses.replace(m, mean_patch_bytes=measured)
