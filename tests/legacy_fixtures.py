"""How tests/fixtures/legacy/ was made: checkpoints and exports written by the code before the family
registry (commit 213bb7f), kept so that tests/test_legacy_formats.py proves today's code still reads them.

    git worktree add /tmp/legacy 213bb7f
    PYTHONPATH=/tmp/legacy .venv/bin/python tests/legacy_fixtures.py

writes, under tests/fixtures/legacy/:
    moe/checkpoint        a DeepSpeed checkpoint (2 ranks, ep_size 2: one file per expert) at step 2
    moe/export            its export: weights, config.json (with calibration), tokenizer.json
    neurofm/checkpoint    an FSDP2 / DCP checkpoint (2 ranks) at step 2
    neurofm/export        its export: weights and the dataset's metadata

The inputs are made here (a text file, two sessions of recordings), so the tests rebuild datasets
that fit these models without the fixture holding any dataset.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"


def write_text(root: Path) -> Path:
    """A small English-like corpus (deterministic), one document per line."""
    rng = np.random.default_rng(0)
    words = ["the", "model", "routes", "each", "token", "to", "two", "experts", "and", "learns", "from", "text",
             "of", "a", "ray", "cluster", "with", "many", "workers", "that", "train", "together"]
    lines = [" ".join(rng.choice(words, size=int(rng.integers(8, 30)))) + "." for _ in range(600)]
    path = root / "corpus.jsonl"
    path.write_text("\n".join(f'{{"text": "{line}"}}' for line in lines) + "\n")
    return path


def moe_overrides(root: Path, tokenizer: str = "") -> list[str]:
    return [f"output_dir={root / 'runs'}", "name=legacy-moe", "model.flavour=tiny", "model.dim=32",
            "model.expert_ffn_dim=32", "model.dense_ffn_dim=64", "model.max_seq_len=32",
            f"data.source={write_text(root)}", "data.vocab_size=300", "data.seq_len=16", f"data.tokenizer={tokenizer}",
            f"data.output_dir={root / 'text'}", "train.ep_size=2", "train.micro_batch_size=2", "train.max_steps=2",
            "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.max_failures=0"]


def write_recordings(root: Path, seconds: int = 40) -> list[str]:
    """Two sessions as NPY files: s1 has EEG (3 ch, 160 Hz) and ECG (250 Hz); s2 has EEG only, so its
    windows miss a modality. Both rates differ from the targets, so both get resampled. Returns their
    `data.recordings` entries."""
    rng = np.random.default_rng(0)
    t_eeg, t_ecg = np.arange(seconds * 160) / 160, np.arange(seconds * 250) / 250
    specs = []
    for session, with_ecg in (("s1", True), ("s2", False)):
        eeg = np.stack([np.sin(2 * np.pi * f * t_eeg) + 0.3 * rng.standard_normal(t_eeg.size) for f in (3.0, 7.0, 11.0)])
        np.save(root / f"{session}_eeg.npy", eeg.astype(np.float32))
        specs.append(f"{{path: {root / f'{session}_eeg.npy'}, modality: eeg, rate: 160, channels: [C3, Cz, C4], "
                     f"session: {session}}}")
        if with_ecg:
            ecg = np.sin(2 * np.pi * 1.2 * t_ecg) ** 15 + 0.05 * rng.standard_normal(t_ecg.size)
            np.save(root / f"{session}_ecg.npy", ecg[None].astype(np.float32))
            specs.append(f"{{path: {root / f'{session}_ecg.npy'}, modality: ecg, rate: 250, channels: [II], "
                         f"session: {session}}}")
    return specs


def neurofm_overrides(root: Path) -> list[str]:
    return [f"output_dir={root / 'runs'}", "name=legacy-neurofm", "model.flavour=tiny", "data.samples=[]",
            f"data.recordings=[{', '.join(write_recordings(root))}]", "data.modalities.eeg.max_channels=4",
            "data.context_s=2.0", "data.hop_s=1.0", f"data.output_dir={root / 'series'}", "train.micro_batch_size=4",
            "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
            "train.eval_batches=1", "train.checkpoint_every=2", "train.max_failures=0"]


def make(root: Path) -> None:  # pragma: no cover - run by hand against the old code, see the docstring
    import ray

    from neuraflex_ray.config import load_config
    from neuraflex_ray.train.driver import train
    from neuraflex_ray.workflows import export_checkpoint

    ray.init(num_cpus=4, include_dashboard=False)
    for family, config, overrides in (("moe", "moe_debug.yaml", moe_overrides(root)),
                                      ("neurofm", "neurofm_debug.yaml", neurofm_overrides(root))):
        cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / config, overrides)
        result = train(cfg, fresh=True)
        export = export_checkpoint(result["checkpoint"], cfg.data.output_dir, root / f"{family}-export")
        out = FIXTURES / family
        shutil.rmtree(out, ignore_errors=True)
        # DeepSpeed's zero_to_fp32.py / zero_to_torch.py helper scripts are left out: they are not read.
        shutil.copytree(result["checkpoint"], out / "checkpoint", ignore=shutil.ignore_patterns("zero_to_*.py"))
        shutil.copytree(export, out / "export")
        for f in (out / "export").glob("fisher.*"):
            f.unlink()
    ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        make(Path(tmp))
    print(f"wrote {FIXTURES}", file=sys.stderr)
