"""NeuroFM's Train task: time-series windows in, masked reconstruction + forecasting + contrastive out."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from neuraflex_ray.config import JobConfig
from neuraflex_ray.eval.embedding_stats import embedding_report
from neuraflex_ray.families.neurofm.augment import augment_window
from neuraflex_ray.finetune.hooks import FinetuneHooks
from neuraflex_ray.models.neurofm import SeriesInput, neurofm_flops_per_window, window_inputs
from neuraflex_ray.models.neurofm_objectives import contrastive_views, neurofm_loss
from neuraflex_ray.train.task import StepOutput, Task, gather_across_ranks, global_batches
from pipelines.modality_buckets import bucket_by_modality
from pipelines.timeseries import series_batch


class NeuroTask(FinetuneHooks, Task):
    """NeuroFM on time-series windows: masked reconstruction + forecasting + cross-modal contrastive.

    Training steps apply the `data.augment` augmentations (`augment.py` here) to each window
    before the loss; evaluation steps never do, so validation numbers do not depend on them.
    """

    unit = "patches"
    # proj_variance / proj_covariance / spectral: only when their weight is > 0.
    # spread / effective_rank: of the fused window embedding the probes read, over the evaluation's
    # windows (eval/embedding_stats.py); per modality as spread_<m> / effective_rank_<m> of the
    # projection retrieval uses, when the contrastive term trains it.
    val_metrics = ("loss", "recon", "forecast", "contrastive", "variance", "proj_variance", "proj_covariance",
                   "spectral", "spread", "effective_rank")
    primary = "loss"  # the weighted sum of the objectives

    def __init__(self, cfg: JobConfig, loop_data: dict[str, Any], rank: int = 0):
        super().__init__(cfg, loop_data, rank)
        self.manifest = loop_data["manifest"]
        self._generator: tuple[int, torch.Generator] | None = None

    def generator(self, step: int) -> torch.Generator:
        """Masks and curriculum draws, seeded by (seed, step, rank): a run resumed at step s draws
        exactly what the uninterrupted run drew, without saving generator state."""
        if self._generator is None or self._generator[0] != step:
            seed = (self.cfg.train.seed * 1_000_003 + step) * 1009 + self.rank
            self._generator = (step, torch.Generator().manual_seed(seed))
        return self._generator[1]

    def peak_shape(self) -> tuple[int, int, int]:
        """(m, k, n) like the backbone's MLP over a micro-batch's latents (about 1,024 rows)."""
        m = self.cfg.model
        return 1024, m.dim, m.ffn_mult * m.dim

    def batches(self, ds: Any, micro_bs: int, rank: int, world: int, skip: int = 0,
                train: bool = False) -> Iterator[dict[str, Any]]:
        """This rank's slice, keeping only modalities present somewhere in the *global* batch.

        FSDP reduce-scatters the gradients of the parameters that got one; every rank must agree on
        that set, so it is decided from the global batch that all ranks see, never from the slice.
        Training batches are regrouped by modality set with `data.batch_by_modality`
        (pipelines/modality_buckets.py); `skip` then counts regrouped batches.
        """
        bucket = train and self.cfg.data.batch_by_modality
        # Without regrouping a skipped batch is never converted; with it, `skip` counts regrouped batches.
        stream = (series_batch(b, self.manifest) for b in global_batches(ds, micro_bs, world, 0 if bucket else skip))
        if bucket:
            stream = itertools.islice(bucket_by_modality(stream, micro_bs * world), skip, None)
        for arrays in stream:
            yield window_inputs(arrays, slice(rank * micro_bs, (rank + 1) * micro_bs))

    def fingerprint(self, window: dict[str, Any]) -> int:
        first = next(iter(window.values()))
        return int(first.x[0].abs().sum() * 1000)

    def tokens(self, window: dict[str, Any]) -> int:
        """Patch tokens the encoder saw: valid channels of present modalities x context patches."""
        n = self.cfg.model.context_patches
        return int(sum(((w.chan > 0) & w.present[:, None]).sum() for w in window.values())) * n

    def step(self, model: Callable, window: dict[str, Any], step: int, device: torch.device, train: bool = True) -> StepOutput:
        # Counted on the host copy (no device sync per micro-batch) and before augmentation: a dropped
        # modality's tokens are masked, not removed, so the encoder still does their work.
        tokens = self.tokens(window)
        batch = next(iter(window.values())).x.shape[0]
        window = {m: dataclasses.replace(w, x=w.x.to(device), chan=w.chan.to(device), present=w.present.to(device),
                                         hide=None if w.hide is None else w.hide.to(device))
                  for m, w in window.items()}
        # Evaluation scores the final curriculum stage with the same masks every time, so values
        # compare across evaluations (and across Tune trials).
        stage_step = step if train else self.cfg.train.max_steps
        gen = self.generator(step) if train else torch.Generator().manual_seed(self.cfg.train.seed + 7 + self.rank)
        if train and self.cfg.data.augment.enabled:
            # Drawn from the step's generator, before the loss's masks: a resumed run repeats both.
            window = augment_window(window, self.cfg.data.augment, self.manifest, gen)
        loss = neurofm_loss(model, window, self.cfg.model, stage_step, gen, gather=gather_across_ranks())
        views = contrastive_views(self.cfg.model, stage_step, len(window))
        flops = neurofm_flops_per_window(self.cfg.model, tokens // max(1, batch), contrastive_modalities=views) * batch
        parts = {name: getattr(loss, name).detach() for name in ("recon", "forecast", "contrastive", "variance")}
        # Issue 27's terms only when switched on: a line of zeros says nothing.
        m = self.cfg.model
        for name, weight in (("proj_variance", m.vicreg_weight), ("proj_covariance", m.vicreg_cov_weight),
                             ("spectral", m.spectral_weight)):
            if weight > 0:
                parts[name] = getattr(loss, name).detach()
        total = self.with_penalty(loss.total, train)
        return StepOutput(total, parts, tokens, flops, rows={} if train else self._embedding_rows(model, window))

    def _embedding_rows(self, model: Callable, window: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The window embeddings of the unmasked context, as the probes and retrieval compute them:
        the fused one and, when the contrastive term trains the projection, each modality's alone."""
        m_cfg = self.cfg.model
        patch = dict(zip(m_cfg.modalities, m_cfg.patch_lens, strict=True))
        inputs = {}
        for m, w in window.items():
            x = w.x[..., : m_cfg.context_patches * patch[m]]
            if w.hide is not None:
                x = x.masked_fill(w.hide[..., : x.shape[-1]], 0.0)
            inputs[m] = SeriesInput(x=x, chan=w.chan, present=w.present)
        # Decided by config and the batch's modality keys only, which every FSDP rank shares.
        per_modality = len(inputs) >= 2 and m_cfg.contrastive_weight > 0
        out = model(inputs, decode=False, per_modality=per_modality)
        rows = {"embedding": out.embedding, "present:any": torch.stack([w.present for w in window.values()]).any(0)}
        for m, z in out.modality_embeddings.items():
            rows[f"projection:{m}"], rows[f"present:{m}"] = z, window[m].present
        return rows

    def eval_set_metrics(self, rows: dict[str, np.ndarray]) -> dict[str, float]:
        """Collapse measures over the evaluation's windows (every rank's): spread and effective rank."""
        fused = embedding_report(rows["embedding"][rows["present:any"] > 0.5])
        out = {"spread": fused["spread"], "effective_rank": fused["effective_rank"]}
        for key in sorted(k for k in rows if k.startswith("projection:")):
            m = key.split(":", 1)[1]
            report = embedding_report(rows[key][rows[f"present:{m}"] > 0.5])
            out[f"spread_{m}"], out[f"effective_rank_{m}"] = report["spread"], report["effective_rank"]
        return out

    def log_extras(self, parts: dict[str, float], writer: Any, step: int) -> tuple[dict[str, float], str]:
        text = (f"recon {parts['recon']:.4f} | forecast {parts['forecast']:.4f} | contrastive {parts['contrastive']:.4f} "
                f"| variance {parts['variance']:.4f}")
        for name in ("proj_variance", "proj_covariance", "spectral"):  # present when switched on
            if name in parts:
                text += f" | {name} {parts[name]:.4f}"
        return {}, text
