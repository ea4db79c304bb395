"""NeuroFM fine-tuning on real Ray Train workers with real FSDP2 (gloo): LoRA on a new subject's recordings.

The base is an untrained tiny export (serving/scratch.py: EEG Fp1/C3/Cz at 32 Hz, ECG II at 16 Hz);
the new recordings are synthetic NPY files with those channel names at other rates, so the pipeline
resamples them and maps their channels onto the export's ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.config import ConfigError, load_config
from neuraflex_ray.finetune.lora import fingerprint, load_adapter
from neuraflex_ray.finetune.run import finetune, merge_adapter
from neuraflex_ray.models.neurofm import SeriesInput
from neuraflex_ray.serving.scratch import scratch_neurofm_export


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


def window(model) -> dict[str, SeriesInput]:
    g = torch.Generator().manual_seed(0)
    n = model.cfg.context_patches
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
