"""The entropy model as a stage of the BLT job (`data.entropy_model: train`): trained before the bytes
are scored, on the same Ray Train loop as every other model.

It is an ordinary NeuralFlex-MoE (`data.entropy_flavour`) trained for `data.entropy_steps` on the
byte-level text dataset the byte pipeline already built (`<data.output_dir>/text`, one token per byte),
with context for a whole block plus the <|endoftext|> it starts from. Its run and export live under
`<data.output_dir>/entropy/model`; the export records the settings it was trained with, and a later
build with the same settings and the same corpus reuses it instead of training again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuraflex_ray.config import JobConfig, config_from_raw
from neuraflex_ray.config.blt import ByteDataConfig
from neuraflex_ray.eval.lm import bits_per_byte

RUN_NAME = "model"


def entropy_job(cfg: ByteDataConfig, text_dir: Path) -> JobConfig:
    """The entropy model's training job: 2 workers, DeepSpeed with expert parallelism, tiny batches."""
    steps = cfg.entropy_steps
    return config_from_raw({
        "name": RUN_NAME,
        "output_dir": str(Path(cfg.output_dir).expanduser().resolve() / "entropy"),
        "model_type": "moe_lm",
        "model": {"flavour": cfg.entropy_flavour, "max_seq_len": cfg.block_bytes + 1},
        "data": {"source": cfg.source, "text_field": cfg.text_field, "vocab_size": 257, "seq_len": cfg.block_bytes,
                 "val_fraction": cfg.val_fraction, "min_val_documents": cfg.min_val_documents,
                 "max_bytes": cfg.max_bytes, "output_dir": str(text_dir), "seed": cfg.seed},
        "train": {"num_workers": 2, "ep_size": 2, "micro_batch_size": 8, "max_steps": steps,
                  "warmup_steps": min(20, steps // 10), "eval_every": steps, "eval_batches": 4,
                  "log_every": max(1, steps // 10), "checkpoint_every": steps, "lr": 3e-3, "seed": cfg.seed},
    })


def settings_of(cfg: ByteDataConfig, text_manifest: dict[str, Any]) -> dict[str, Any]:
    """What the trained entropy model depends on: reused only when all of it is unchanged."""
    return {"flavour": cfg.entropy_flavour, "steps": cfg.entropy_steps, "block_bytes": cfg.block_bytes,
            "seed": cfg.seed, "corpus": text_manifest["source_fingerprint"]}


def trained_entropy_model(cfg: ByteDataConfig, text_manifest: dict[str, Any], force: bool = False) -> Path:
    """The export of the entropy model for this corpus and these settings, trained now if there is none."""
    from neuraflex_ray.checkpoint import export_checkpoint
    from neuraflex_ray.train.driver import train

    job = entropy_job(cfg, Path(cfg.output_dir).expanduser().resolve() / "text")
    export = job.run_dir / "export"
    settings = settings_of(cfg, text_manifest)
    if not force and (export / "config.json").is_file():
        if json.loads((export / "config.json").read_text()).get("entropy_settings") == settings:
            print(f"[entropy] reusing the entropy model {export} (same corpus and settings)", flush=True)
            return export
    print(f"[entropy] training the entropy model ({cfg.entropy_flavour}, {cfg.entropy_steps} steps) on the "
          f"corpus's bytes", flush=True)
    result = train(job, fresh=True)
    t = job.train
    tokens = result["steps"] * t.micro_batch_size * t.num_workers * t.grad_accum_steps * job.data.seq_len
    bpb = bits_per_byte(result["val_loss"], result["manifest"]["val_bytes_per_token"])
    export_checkpoint(result["checkpoint"], job.data.output_dir, export,
                      {"run_dir": str(job.run_dir), "steps": result["steps"], "entropy_settings": settings,
                       "train_flops": tokens * result["flops_per_token"], "val_bits_per_byte": bpb})
    print(f"[entropy] held-out {bpb:.3f} bits/byte; export -> {export}", flush=True)
    return export
