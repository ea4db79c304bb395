"""NeuroFM fine-tuning on real Ray Train workers with real FSDP2 (gloo): LoRA on a new subject's recordings.

The base is an untrained tiny export (serving/scratch.py: EEG Fp1/C3/Cz at 32 Hz, ECG II at 16 Hz);
the new recordings are synthetic NPY files with those channel names at other rates, so the pipeline
resamples them and maps their channels onto the export's ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.config import ConfigError, load_config
from neuraflex_ray.families.neurofm.scratch import scratch_neurofm_export
from neuraflex_ray.finetune.lora import fingerprint
from neuraflex_ray.finetune.methods import load_adapter
from neuraflex_ray.finetune.run import finetune, merge_adapter
from neuraflex_ray.models.neurofm import SeriesInput


def recordings(root: Path, eeg_channels: str = "[Fp1, C3, Cz]") -> str:
    rng = np.random.default_rng(1)
    t_eeg, t_ecg = np.arange(120 * 64) / 64, np.arange(120 * 50) / 50
    eeg = np.stack([np.sin(2 * np.pi * f * t_eeg) + 0.2 * rng.standard_normal(t_eeg.size) for f in (2.0, 5.0, 7.0)])
    ecg = np.sin(2 * np.pi * 1.1 * t_ecg) ** 9 + 0.05 * rng.standard_normal(t_ecg.size)
    np.save(root / "eeg.npy", eeg.astype(np.float32))
    np.save(root / "ecg.npy", ecg[None].astype(np.float32))
    return (f"[{{path: {root / 'eeg.npy'}, modality: eeg, rate: 64, channels: {eeg_channels}, session: new}}, "
            f"{{path: {root / 'ecg.npy'}, modality: ecg, rate: 50, channels: [II], session: new}}]")


def job(tmp: Path, base: Path, name: str, *extra: str):
    return load_config(None, [
        "model_type=neurofm", "train.strategy=fsdp", f"name={name}", f"output_dir={tmp / 'runs'}",
        f"finetune.from_export={base}", "finetune.method=lora", "finetune.lora_rank=2", "finetune.lora_alpha=4",
        "finetune.lora_targets=[linear]",
        # The export's data layout: 2 s context of 0.25 s patches, EEG at 32 Hz and ECG at 16 Hz.
        "data.samples=[]", f"data.recordings={recordings(tmp)}", "data.modalities={eeg: {rate: 32, max_channels: 3}, "
        "ecg: {rate: 16, max_channels: 1}}", "data.context_s=2.0", "data.horizons_s=[0.25, 0.5]", "data.hop_s=1.0",
        f"data.output_dir={tmp / name / 'data'}",
        "train.num_workers=2", "train.micro_batch_size=4", "train.max_steps=6", "train.warmup_steps=1",
        "train.log_every=2", "train.eval_every=6", "train.eval_batches=2", "train.checkpoint_every=3", "train.lr=1e-2",
        *extra,
    ])


@pytest.fixture(scope="module")
def tuned(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ftneuro")
    base = scratch_neurofm_export(tmp / "base")
    # A worker fails at step 4; Train restarts the group from the step-3 checkpoint, adapters included.
    return tmp, base, finetune(job(tmp, base, "lora", "train.inject_failure_at_step=4"), fresh=True)


def window(model, patches: int | None = None, seed: int = 0) -> dict[str, SeriesInput]:
    g = torch.Generator().manual_seed(seed)
    n = patches or model.cfg.context_patches
    return {m: SeriesInput(x=torch.randn(2, c, n * p, generator=g), chan=torch.tensor([ids] * 2),
                           present=torch.ones(2, dtype=torch.bool))
            for m, p, c, ids in (("eeg", 8, 3, [2, 3, 4]), ("ecg", 4, 1, [1]))}


def test_lora_finetune_on_fsdp_recovers_a_failed_worker_and_writes_an_adapter_that_merges(tuned):
    tmp, base, out = tuned
    assert out["steps"] == 6 and out["restored_from_step"] == 3
    meta = json.loads((Path(out["adapter"]) / "adapter.json").read_text())
    assert meta["base_fingerprint"] == fingerprint(base) and meta["targets"] == ["linear"]
    assert 0 < meta["adapter_params"] < 0.2 * meta["base_params"]
    merged = merge_adapter(base, out["adapter"], tmp / "merged")
    m_merged, _ = load_exported(merged)
    m_base, _ = load_exported(base)
    m_adapted, _ = load_exported(base)
    load_adapter(m_adapted, out["adapter"], base)
    x = window(m_base)
    with torch.no_grad():
        e_base, e_adapted, e_merged = (m.eval()(x).embedding for m in (m_base, m_adapted, m_merged))
    assert torch.allclose(e_merged, e_adapted, atol=1e-5)  # merge = base + adapter
    assert not torch.allclose(e_merged, e_base, atol=1e-4)  # and the adapter learned something


def test_a_channel_the_export_never_saw_is_refused(tuned):
    tmp, base, _ = tuned
    bad = tmp / "bad"
    bad.mkdir()
    cfg = job(bad, base, "bad", f"data.recordings={recordings(bad, '[Fp1, C3, Oz]')}")
    with pytest.raises(ValueError, match=r"channel_table: channels \['eeg:Oz'\]"):
        finetune(cfg, fresh=True)


def test_neurofm_lora_needs_linear_targets(tmp_path):
    base = scratch_neurofm_export(tmp_path / "base")
    from neuraflex_ray.config import validate

    with pytest.raises(ConfigError, match=r"lora_targets=\[linear\]"):
        validate(job(tmp_path, base, "x", "finetune.lora_targets=[attention]"))


def _ewc_paths(config: dict) -> dict:
    """Inside a Ray Train worker: EWC on FSDP2's shards against the same penalty on the local model.

    Both start from the same weights and move by the same seeded step; each rank then runs the data
    loss on its own window plus its share of the penalty through the strategy's backward. FSDP's
    gradient must be the mean of both ranks' data gradients plus the whole penalty's gradient.
    """
    import ray.train
    import torch.distributed as dist

    from neuraflex_ray.config import JobConfig
    from neuraflex_ray.finetune.ewc import EWC
    from neuraflex_ray.finetune.lora import apply_lora
    from neuraflex_ray.models.neurofm import NeuroFM
    from neuraflex_ray.models.neurofm_objectives import neurofm_loss
    from neuraflex_ray.train.strategy import FSDPStrategy

    cfg = JobConfig.from_dict(config["job"])
    rank = ray.train.get_context().get_world_rank()
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in NeuroFM(cfg.model).named_parameters()}

    def adapt(m: torch.nn.Module) -> torch.nn.Module:  # LoRA (seeded, so equal on both sides) or nothing
        if config["lora"]:
            apply_lora(m, 2, 4.0, 0.0, ["linear"])
        return m

    torch.manual_seed(0)
    local = adapt(NeuroFM(cfg.model))
    moves = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in local.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    sharded = FSDPStrategy(cfg)
    model = sharded.setup(NeuroFM(cfg.model), adapt=adapt)
    ewc = EWC(model, fisher, 50.0, lambda n: n, lambda n: None)
    ewc_local = EWC(local, fisher, 50.0, lambda n: n, lambda n: None)
    assert len(ewc.terms) == len(ewc_local.terms) > 0
    at_anchor = float(ewc.penalty().detach())
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for (n, p), (_, q) in zip(model.named_parameters(), local.named_parameters(), strict=True):
            if n in moves:
                p.to_local().add_(distribute_tensor(moves[n], p.device_mesh, p.placements, src_data_rank=None).to_local())
                q.add_(moves[n])
    share = ewc.penalty().detach().clone()
    dist.all_reduce(share)

    def data_loss(m: torch.nn.Module, r: int) -> torch.Tensor:  # rank r's window: context and future
        x = window(local, cfg.model.context_patches + max(cfg.model.horizon_patches), seed=r)
        return neurofm_loss(m, x, cfg.model, 10**9, torch.Generator().manual_seed(r)).total

    sharded.backward(data_loss(model, rank) + ewc.penalty())
    (0.5 * (data_loss(local, 0) + data_loss(local, 1)) + ewc_local.penalty()).backward()
    worst = max(float((p.grad.full_tensor() - q.grad).abs().max() / (q.grad.abs().max() + 1e-12))
                for p, q in zip(model.parameters(), local.parameters(), strict=True) if q.grad is not None)
    return {"at_anchor": at_anchor, "penalty": float(share), "local": float(ewc_local.penalty().detach()),
            "grad_rel_err": worst}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ewc_on_fsdp_shards_equals_the_local_penalty_and_gradient(ray_session, tmp_path, lora):
    import sys

    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from neuraflex_ray.config import neurofm_for_data
    from neuraflex_ray.families.neurofm.scratch import SCRATCH_NEURO_MANIFEST

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    cfg = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny", f"output_dir={tmp_path}"])
    cfg.model = neurofm_for_data(cfg.model, SCRATCH_NEURO_MANIFEST)
    out = TorchTrainer(_ewc_paths, train_loop_config={"job": cfg.to_dict(), "lora": lora},
                       scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit().return_value
    assert out["at_anchor"] == 0.0 and out["penalty"] > 0, out
    assert out["penalty"] == pytest.approx(out["local"], rel=1e-4), out  # the ranks' shares add up to the whole
    assert out["grad_rel_err"] < 1e-4, out  # data mean + penalty, through FSDP's reduce-scatter


def test_finetune_with_ewc_on_fsdp_estimates_the_fisher_on_the_original_data(tuned):
    from safetensors.torch import load_file

    tmp, base, _ = tuned
    # The base "was trained on" the LoRA run's dataset: its config.json names it, as a NeuroFM export's does.
    anchored = tmp / "base-with-data"
    shutil.copytree(base, anchored)
    meta = json.loads((anchored / "config.json").read_text())
    meta["data"]["output_dir"] = str(tmp / "lora" / "data")
    (anchored / "config.json").write_text(json.dumps(meta))
    out = finetune(job(tmp, anchored, "ewc", "finetune.method=full", "finetune.ewc_lambda=100",
                       "finetune.fisher_blocks=6", "train.max_steps=3", "train.eval_every=3",
                       "train.checkpoint_every=3"), fresh=True)
    assert out["steps"] == 3
    fisher, model = load_file(str(anchored / "fisher.safetensors")), load_exported(anchored)[0]
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    assert json.loads((anchored / "fisher.json").read_text())["blocks"] == 6
    tuned_model, tuned_meta = load_exported(out["export"])
    assert tuned_meta["ewc_lambda"] == 100 and tuned_meta["data"]["output_dir"] == str((tmp / "ewc" / "data").resolve())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), tuned_model.parameters(), strict=True))
    # LoRA + EWC: the penalty falls on the sharded adapters' updates; the adapter is what it writes.
    lora = finetune(job(tmp, anchored, "lora-ewc", "finetune.ewc_lambda=100", "train.max_steps=2",
                        "train.eval_every=2", "train.checkpoint_every=2",
                        f"data.output_dir={tmp / 'ewc' / 'data'}"), fresh=True)  # the dataset the run above built
    adapter_meta = json.loads((Path(lora["adapter"]) / "adapter.json").read_text())
    assert lora["steps"] == 2 and adapter_meta["ewc_lambda"] == 100 and adapter_meta["method"] == "lora"


def test_neurofm_ewc_without_the_original_data_names_the_field(tmp_path):
    from neuraflex_ray.finetune.setup import finetune_config

    base = scratch_neurofm_export(tmp_path / "base")  # its config.json names no training data
    with pytest.raises(ConfigError, match=r"names None \(data.output_dir\)"):
        finetune_config(job(tmp_path, base, "x", "finetune.method=full", "finetune.ewc_lambda=1"))
