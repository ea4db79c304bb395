"""NeuroFM on real Ray Train workers with real FSDP2 on gloo (tiny model, synthetic recordings in real files).

One module-scoped dataset and one uninterrupted run serve several tests: sharding, resume after a
worker failure, explicit resume, and the consolidated export against the sharded model. A short
run on the state-space backbone (model.backbone=ssm) reuses the dataset and the export check.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

from neuraflex_ray.checkpoint import export_checkpoint, is_complete, load_exported
from neuraflex_ray.config import JobConfig, load_config
from neuraflex_ray.train.driver import latest_checkpoint, train
from tests.legacy_fixtures import write_recordings

# Worker functions defined here must travel by value: the workers cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 8


def job(tmp: Path, name: str, *extra: str) -> JobConfig:
    return load_config("jobs/configs/neurofm_debug.yaml", [
        f"name={name}", f"output_dir={tmp / 'runs'}", "model.flavour=tiny",
        "model.curriculum=[{start_step: 0, mode: unimodal}, {start_step: 4, mode: multimodal}]",
        "data.samples=[]", f"data.recordings=[{', '.join(write_recordings(tmp, seconds=60))}]",
        "data.modalities.eeg.max_channels=4", "data.context_s=2.0", "data.hop_s=1.0", "data.on_bad_input=error",
        f"data.output_dir={tmp / 'data'}",
        # Two signatures (s1: EEG + ECG, s2: EEG alone), regrouped: the resume test below then checks
        # that a restart lands on the same regrouped batches (pipelines/modality_buckets.py).
        "data.batch_by_modality=true",
        "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_every=4", "train.eval_batches=2", "train.checkpoint_every=4", "train.lr=3e-3",
        *extra,
    ])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def baseline(ray_session, base_dir):
    """One uninterrupted 2-worker FSDP2 run."""
    return train(job(base_dir, "baseline"), fresh=True)


def test_two_worker_fsdp_run_trains_on_windows_with_missing_modalities(baseline):
    assert (baseline["strategy"], baseline["workers"], baseline["steps"]) == ("fsdp", 2, STEPS)
    manifest = baseline["manifest"]
    assert list(manifest["modalities"]) == ["eeg", "ecg"]
    s2 = next(r for r in manifest["recordings"] if r["name"] == "s2")
    assert s2["modalities"] == ["eeg"] and s2["train_windows"] > 0  # trained with ECG absent
    losses = [h["loss"] for h in baseline["history"]]
    assert all(math.isfinite(v) for v in losses) and math.isfinite(baseline["val_loss"])
    assert losses[-1] < losses[0], losses
    assert baseline["mfu"] > 0 and baseline["patches_per_s"] > 0
    # Collapse measured at every evaluation, over every rank's windows: the fused embedding and, with
    # the contrastive term on, each modality's projection (eval/embedding_stats.py).
    dim = baseline["model_config"]["dim"]
    for m in ("", "_eeg", "_ecg"):
        assert 0 < baseline[f"val_spread{m}"] <= 2, (m, baseline[f"val_spread{m}"])
        assert 1 <= baseline[f"val_effective_rank{m}"] <= dim, (m, baseline[f"val_effective_rank{m}"])
    ckpt = latest_checkpoint(baseline["run_dir"])
    assert ckpt is not None and is_complete(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert list((Path(baseline["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))


def _shard_rows(config: dict) -> dict:
    """Inside a Ray Train worker: wrap NeuroFM with the FSDP strategy; per parameter, the rows
    (dim 0) each rank holds and whether it is a DTensor sharded on dim 0."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from neuraflex_ray.models.neurofm import NeuroFM
    from neuraflex_ray.train.strategy import FSDPStrategy

    cfg = JobConfig.from_dict(config["job"])
    model = FSDPStrategy(cfg).setup(NeuroFM(cfg.model))
    params = dict(model.named_parameters())
    local = torch.tensor([p.to_local().shape[0] for p in params.values()])
    rows = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    return {name: {"sharded": isinstance(p, DTensor) and p.placements == (Shard(0),), "full": p.shape[0],
                   "bytes_per_row": p[0].numel() * p.element_size(), "rows": [int(r[i]) for r in rows]}
            for i, (name, p) in enumerate(params.items())}


def _run_workers(fn, cfg: JobConfig, **extra) -> list:
    """Run `fn` on 2 Ray Train workers; returns rank 0's return value."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(fn, train_loop_config={"job": cfg.to_dict(), **extra},
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    return result.return_value


def trained_job(run: dict, base_dir: Path) -> JobConfig:
    """A run's config with the data-derived model fields (and its backbone), as the workers saw it."""
    from neuraflex_ray.config import NeuroFMConfig

    cfg = job(base_dir, Path(run["run_dir"]).name)
    return dataclasses.replace(cfg, model=NeuroFMConfig(**run["model_config"]))


def test_each_parameter_is_sharded_across_the_two_workers(baseline, base_dir):
    out = _run_workers(_shard_rows, trained_job(baseline, base_dir))
    assert len(out) > 10
    for name, p in out.items():
        # Shard(0): the ranks split every parameter's rows, ceil(rows/2) and the rest.
        assert p["sharded"], name
        assert sum(p["rows"]) == p["full"] and max(p["rows"]) == -(-p["full"] // 2), (name, p)
    local = [sum(p["rows"][r] * p["bytes_per_row"] for p in out.values()) for r in (0, 1)]
    full = sum(p["full"] * p["bytes_per_row"] for p in out.values())
    assert all(0.45 < b / full < 0.55 for b in local), (local, full)  # each rank holds about half the bytes


def test_worker_failure_resumes_at_the_checkpointed_step_on_the_same_data(baseline, base_dir):
    run = train(job(base_dir, "failed", "train.inject_failure_at_step=6", "train.max_failures=1"), fresh=True)
    assert run["restored_from_step"] == 4  # the last checkpoint before the failure
    assert run["steps"] == STEPS
    # After the restart the workers see exactly the micro-batches the uninterrupted run saw.
    assert run["batch_fingerprints"] == baseline["batch_fingerprints"][4:]
    assert run["final_loss"] == pytest.approx(baseline["final_loss"], rel=1e-4)


def test_explicit_resume_continues_at_the_same_step(baseline, base_dir):
    more = STEPS + 4
    run = train(job(base_dir, "resumed", f"train.resume_from={baseline['run_dir']}", f"train.max_steps={more}"),
                fresh=True)
    assert run["restored_from_step"] == STEPS and run["steps"] == more
    assert run["optimizer_steps"] == more  # the optimizer's own count came back with the checkpoint


def _sharded_outputs(config: dict) -> dict:
    """Inside a Ray Train worker: load the checkpoint into the FSDP-sharded model, run one batch."""
    from neuraflex_ray.models.neurofm import NeuroFM
    from neuraflex_ray.train.strategy import FSDPStrategy

    cfg = JobConfig.from_dict(config["job"])
    strategy = FSDPStrategy(cfg)
    model = strategy.setup(NeuroFM(cfg.model))
    strategy.load(config["checkpoint"])
    strategy.train(False)
    with torch.no_grad():
        return _outputs(model(fixed_inputs(cfg), per_modality=True))


def _outputs(out) -> dict:
    kinds = ("recon", "forecast", "modality_embeddings")
    return {"embedding": out.embedding.numpy(), **{f"{k}.{m}": v.numpy() for k in kinds for m, v in getattr(out, k).items()}}


def fixed_inputs(cfg: JobConfig) -> dict:
    from neuraflex_ray.models.neurofm import SeriesInput

    gen = torch.Generator().manual_seed(7)
    n = cfg.model.context_patches
    inputs = {}
    for m, p in zip(cfg.model.modalities, cfg.model.patch_lens, strict=True):
        c = 3 if m == "eeg" else 1
        inputs[m] = SeriesInput(x=torch.randn(2, c, n * p, generator=gen), chan=torch.arange(1, c + 1).repeat(2, 1),
                                present=torch.tensor([True, m == "eeg"]))
    return inputs


def assert_export_matches_sharded(run: dict, base_dir: Path) -> torch.nn.Module:
    """The consolidated export of a run's last checkpoint, loaded in this process without a process
    group, gives what the FSDP-sharded model loaded from that checkpoint gives. Returns the export."""
    cfg = trained_job(run, base_dir)
    ckpt = latest_checkpoint(run["run_dir"])
    sharded = _run_workers(_sharded_outputs, cfg, checkpoint=str(ckpt))
    export_dir = export_checkpoint(ckpt, cfg.data.output_dir, base_dir / "export" / cfg.name)
    model, meta = load_exported(export_dir)
    assert meta["model_type"] == "neurofm" and list(meta["data"]["modalities"]) == ["eeg", "ecg"]
    with torch.no_grad():
        local = _outputs(model(fixed_inputs(cfg), per_modality=True))
    assert local.keys() == sharded.keys() and len(local) == 1 + 3 * 2  # embedding + recon, forecast, view per modality
    for key, v in local.items():
        np.testing.assert_allclose(v, sharded[key], rtol=1e-5, atol=1e-6, err_msg=key)
    return model


def test_consolidated_export_matches_the_sharded_model(baseline, base_dir):
    assert_export_matches_sharded(baseline, base_dir)


@pytest.fixture(scope="module")
def ssm_collapse(ray_session, base_dir) -> tuple[dict, torch.nn.Module]:
    """One run for two features (a run costs ~20 s here): model.backbone=ssm, each SSM block its own
    FSDP2 unit, with issue 27's objectives (VICReg on the projections gathers every rank's windows; the
    spectral head is a root parameter every rank trains). 6 steps cross the curriculum's switch at step
    4, so the scan also runs on the contrastive views' extra latent groups. Returns (run, its export)."""
    steps = 6
    run = train(job(base_dir, "ssm-collapse", "model.backbone=ssm", "model.vicreg_weight=1.0",
                    "model.vicreg_cov_weight=0.04", "model.spectral_weight=1.0", f"train.max_steps={steps}",
                    f"train.eval_every={steps}", f"train.checkpoint_every={steps}"), fresh=True)
    return run, assert_export_matches_sharded(run, base_dir)


def test_ssm_backbone_trains_sharded_and_its_export_matches(ssm_collapse):
    from neuraflex_ray.models.ssm import SSMBlock

    run, model = ssm_collapse
    assert run["model_config"]["backbone"] == "ssm" and run["steps"] == 6
    assert [h["step"] for h in run["history"]] == [2, 4, 6]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in run["history"])
    assert math.isfinite(run["val_loss"])
    assert all(isinstance(b, SSMBlock) for b in model.blocks)


def test_collapse_objectives_train_sharded_and_the_export_matches(ssm_collapse):
    run, model = ssm_collapse
    last = run["history"][-1]
    assert last["spectral"] > 0 and last["proj_variance"] >= 0 and last["proj_covariance"] >= 0
    assert run["history"][0]["proj_variance"] == 0  # unimodal stage: no projections to keep apart yet
    assert math.isfinite(run["val_spectral"]) and math.isfinite(run["val_spread_ecg"])
    assert model.spectral_head is not None


def _one_step(config: dict) -> dict:
    """Inside a Ray Train worker: one FSDP2 training step on a fixed window, with and without
    activation checkpointing (recomputing a block in backward must not change the step)."""
    from neuraflex_ray.models.neurofm import NeuroFM, SeriesInput
    from neuraflex_ray.models.neurofm_objectives import neurofm_loss
    from neuraflex_ray.train.strategy import FSDPStrategy

    out = {}
    for ac in (False, True):
        cfg = JobConfig.from_dict(config["job"])
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=ac))
        torch.manual_seed(0)
        strategy = FSDPStrategy(cfg)
        model = strategy.setup(NeuroFM(cfg.model))
        n = cfg.model.context_patches + max(cfg.model.horizon_patches)
        window = {m: SeriesInput(x=torch.randn(2, 2, n * p, generator=torch.Generator().manual_seed(1)),
                                 chan=torch.tensor([[1, 2], [1, 2]]), present=torch.tensor([True, True]))
                  for m, p in zip(cfg.model.modalities, cfg.model.patch_lens, strict=True)}
        loss = neurofm_loss(model, window, cfg.model, STEPS, torch.Generator().manual_seed(2))
        strategy.backward(loss.total)
        out[ac] = (float(loss.total), strategy.step(1e-3))
    return {"plain": out[False], "checkpointed": out[True]}


def test_activation_checkpointing_recomputes_the_same_step(baseline, base_dir):
    out = _run_workers(_one_step, trained_job(baseline, base_dir))
    assert out["checkpointed"] == pytest.approx(out["plain"], rel=1e-5)  # (loss, global grad norm)
