"""The stages after training, each usable alone (CLI) or chained (quickstart).

export:   sharded checkpoint (DeepSpeed or FSDP2/DCP) -> consolidated safetensors + config
          (+ the LM's tokenizer; NeuroFM's modalities, rates and channel ids)
evaluate: in one process on held-out data, each metric beside a baseline fitted on the training
          split only. LM: bits per byte vs a bigram. NeuroFM: forecasting skill vs persistence and
          ridge autoregression, masked-channel R^2 vs ridge (zero-shot and adapted), cross-modal
          retrieval vs chance, and probes: labelled tasks decoded from frozen embeddings vs
          classical features.
generate: a completion from an LM export
serve:    the LM export on Ray Serve, called once over HTTP (the OpenAI completions API)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraflex_ray.atomic import write_json_atomic
from neuraflex_ray.checkpoint import consolidate_deepspeed, consolidate_fsdp, export, load_exported, read_checkpoint_state
from neuraflex_ray.config import ConfigError, JobConfig
from neuraflex_ray.models.moe_lm import MoELM, generate, lm_loss


def export_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path,
                      metadata: dict[str, Any] | None = None) -> Path:
    """The model config comes from the checkpoint itself, so the export is the model that trained."""
    meta = {"source_checkpoint": str(checkpoint), **(metadata or {})}
    if read_checkpoint_state(checkpoint)["strategy"] == "fsdp":
        state, model_cfg = consolidate_fsdp(checkpoint)
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        # What a server needs to turn raw streams into model inputs, without the dataset; and what the
        # probe (eval/probe_tasks.py) needs to rebuild the pretraining's split: the data config
        # (val_fraction, reject_abs_z) and each recording's split_s, to check it against.
        keep = ("modalities", "channel_ids", "n_channel_ids", "context_s", "patch_s", "horizons_s", "hop_s",
                "context_patches", "horizon_patches", "norm_stats", "data_config", "recordings")
        data = {k: manifest[k] for k in keep if k in manifest}
        data["output_dir"] = str(Path(data_dir).resolve())  # the original data a fine-tune's EWC needs
        return export(state, model_cfg, None, out_dir, {**meta, "data": data})
    state, model_cfg = consolidate_deepspeed(checkpoint)
    # Where its held-out text lives (`neuraflex-ray inspect` reads it from there by default).
    meta["data"] = {"output_dir": str(Path(data_dir).resolve())}
    out = export(state, model_cfg, Path(data_dir) / "tokenizer.json", out_dir, meta)
    calibrate_export(out, data_dir)
    return out


def calibrate_export(export_dir: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """Fit the LM export's confidence temperature on its validation text and store it in config.json
    (eval/calibration.py); Serve reports token confidence under it."""
    from neuraflex_ray.eval.calibration import calibrate
    from pipelines.text import load_text_datasets, read_blocks

    model, meta = load_exported(export_dir)
    _, val_ds, _ = load_text_datasets(str(data_dir))
    meta["calibration"] = calibrate(model, read_blocks(val_ds))
    write_json_atomic(Path(export_dir) / "config.json", meta)
    return meta["calibration"]


@torch.no_grad()
def heldout_loss(model: MoELM, blocks: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-token cross entropy (nats/token) over every held-out block, dropless local path."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        tokens = torch.from_numpy(blocks[i:i + batch_size].astype(np.int64))
        logits, stats = model(tokens[:, :-1])
        ce = lm_loss(logits, tokens[:, 1:], stats, model.cfg).ce
        total += float(ce) * tokens[:, 1:].numel()
        count += tokens[:, 1:].numel()
    return total / count


def evaluate_export(export_dir: str | Path, data_dir: str | Path) -> dict[str, Any]:
    if json.loads((Path(export_dir) / "config.json").read_text()).get("model_type") == "neurofm":
        return evaluate_neurofm_export(export_dir, data_dir)
    from neuraflex_ray.eval.lm import bigram_bits_per_byte, bits_per_byte
    from pipelines.text import load_text_datasets, read_blocks

    model, _ = load_exported(export_dir)
    train_ds, val_ds, manifest = load_text_datasets(str(data_dir))
    val_blocks, train_blocks = read_blocks(val_ds), read_blocks(train_ds)
    bpt = manifest["val_bytes_per_token"]
    loss = heldout_loss(model, val_blocks)
    return {
        "val_loss": loss,
        "val_bits_per_byte": bits_per_byte(loss, bpt),
        "bigram_bits_per_byte": bigram_bits_per_byte(train_blocks, val_blocks, manifest["vocab_size"], bpt),
        "val_tokens": int(val_blocks[:, 1:].size),
    }


def generate_text(export_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    from pipelines.text import EOS, load_tokenizer

    model, _ = load_exported(export_dir)
    tok = load_tokenizer(str(Path(export_dir) / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids = generate(model, tok.encode(prompt).ids, max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_ids=(eos,) if eos is not None else (), seed=seed)
    return tok.decode(ids)


def serve_and_call(export_dir: str | Path, prompt: str, max_tokens: int, seed: int, port: int = 8000) -> dict[str, Any]:
    """Deploy the export on Ray Serve, send it one OpenAI completions request over HTTP, take it down."""
    from ray import serve

    from neuraflex_ray.serving.deploy import deploy, free_port, post_json

    url = deploy([str(export_dir)], port=free_port(port))
    request = {"model": "neuraflex-moe", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "top_k": 50,
               "seed": seed}
    t0 = time.perf_counter()
    reply = post_json(f"{url}/v1/completions", request)
    latency = time.perf_counter() - t0
    serve.shutdown()
    print(f"[serve] POST {url}/v1/completions -> {reply['choices'][0]['text']!r} ({latency * 1e3:.0f} ms)", flush=True)
    return {"url": f"{url}/v1/completions", "request": request, "completion": reply["choices"][0]["text"],
            "usage": reply["usage"], "latency_ms": latency * 1e3}


def probe_export(export_dir: str | Path, cache_dir: str = "") -> dict[str, Any]:
    """Downstream decoding from the export's frozen embeddings (eval/probe.py), printed as a table."""
    from neuraflex_ray.eval.probe import format_table, probe

    result = probe(export_dir, cache_dir=cache_dir)
    print(format_table(result), flush=True)
    return result


def evaluate_neurofm_export(export_dir: str | Path, data_dir: str | Path, *, seed: int = 0) -> dict[str, Any]:
    from neuraflex_ray.eval.neuro import evaluate_neurofm, format_table
    from pipelines.timeseries import read_series

    model, meta = load_exported(export_dir)
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    for key in ("modalities", "channel_ids"):  # the model's channel embeddings index these ids
        if meta["data"][key] != manifest[key]:
            raise ConfigError(f"data.output_dir={data_dir}: the dataset's {key} differ from those {export_dir} was "
                              f"trained on; evaluate on the dataset the model was trained with")
    train_arrays, recordings, starts = read_series(str(data_dir), "train")
    # Train rows are stored shuffled; in time order per recording, the slice the baselines hold out
    # to choose their ridge penalty is whole late recordings, not windows overlapping the fitted ones.
    order = np.lexsort((starts, recordings))
    train_arrays = {m: dataclasses.replace(a, x=a.x[order], chan=a.chan[order], present=a.present[order])
                    for m, a in train_arrays.items()}
    val_arrays, _, _ = read_series(str(data_dir), "val")
    # No torch.no_grad() here: the masked-channel adaptation trains a copy (evaluate_neurofm scores under no_grad).
    result = evaluate_neurofm(model, train_arrays, val_arrays, manifest, seed=seed)
    print(format_table(result), flush=True)
    return result


def train_and_export(cfg: JobConfig) -> tuple[dict[str, Any], Path, Path]:
    """Distributed training from scratch, then the consolidated export of its last checkpoint."""
    from neuraflex_ray.train.driver import train

    result = train(cfg, fresh=True)
    run_dir = Path(result["run_dir"])
    export_dir = export_checkpoint(result["checkpoint"], cfg.data.output_dir, run_dir / "export",
                                   {"run_dir": str(run_dir), "steps": result["steps"]})
    print(f"[export] consolidated checkpoint -> {export_dir}", flush=True)
    return result, run_dir, export_dir


def _write_summary(run_dir: Path, summary: dict[str, Any], flops_convention: str) -> dict[str, Any]:
    summary["train"]["mfu_note"] = ("MFU = achieved model FLOP/s per worker / fp32 matmul FLOP/s measured on the same "
                                    "worker in the same run (best of 5 bursts, matrices shaped like the model's); "
                                    f"{flops_convention}")
    write_json_atomic(run_dir / "summary.json", summary)
    print(f"[quickstart] summary -> {run_dir / 'summary.json'}", flush=True)
    return summary


def quickstart_neurofm(cfg: JobConfig) -> dict[str, Any]:
    """data -> train (Ray Train, FSDP2) -> export -> held-out eval against baselines -> summary.json"""
    t0 = time.perf_counter()
    result, run_dir, export_dir = train_and_export(cfg)
    manifest = result["manifest"]
    ev = evaluate_neurofm_export(export_dir, cfg.data.output_dir, seed=cfg.train.seed)
    ev["probes"] = probe_export(export_dir, cfg.data.cache_dir)
    summary = {
        "pipeline": {"recordings": len(manifest["recordings"]), "modalities": list(manifest["modalities"]),
                     "train_windows": manifest["train_windows"], "val_windows": manifest["val_windows"],
                     "skipped": manifest.get("skipped", []),
                     "sessions": [{k: r.get(k) for k in ("name", "modalities", "duration_s", "train_windows", "val_windows")}
                                  for r in manifest["recordings"]]},
        "train": {k: result[k] for k in ("strategy", "workers", "steps", "final_loss", "val_loss", "mfu", "patches_per_s",
                                         "peak_flops_per_worker", "data_wait_frac", "fwd_bwd_frac",
                                         "optimizer_frac", "checkpoint")},
        "eval": ev,
        "export": {"path": str(export_dir)},
        "wall_s": time.perf_counter() - t0,
    }
    return _write_summary(run_dir, summary, "model FLOPs = 3 x forward matmul FLOPs per window")


def quickstart(cfg: JobConfig, prompt: str = "def fibonacci(n):\n") -> dict[str, Any]:
    """data -> train (Ray Train, DeepSpeed EP) -> export -> eval -> generate -> serve -> summary.json"""
    if cfg.model_type == "neurofm":
        return quickstart_neurofm(cfg)
    t0 = time.perf_counter()
    result, run_dir, export_dir = train_and_export(cfg)
    manifest = result["manifest"]
    ev = evaluate_export(export_dir, cfg.data.output_dir)
    print(f"[eval] held-out bits/byte {ev['val_bits_per_byte']:.4f} vs bigram {ev['bigram_bits_per_byte']:.4f}",
          flush=True)
    completion = generate_text(export_dir, prompt, max_new_tokens=48, temperature=0.7, top_k=50,
                               seed=cfg.train.seed)
    print(f"[generate] {prompt!r} -> {completion!r}", flush=True)
    summary = {
        "pipeline": {k: manifest[k] for k in ("train_tokens", "val_tokens", "vocab_size", "seq_len")},
        "train": {k: result[k] for k in ("strategy", "workers", "ep_size", "zero_stage", "steps", "tokens_per_s",
                                         "mfu", "final_loss", "val_loss", "peak_flops_per_worker", "data_wait_frac",
                                         "fwd_bwd_frac", "optimizer_frac", "flops_per_token", "checkpoint")},
        "eval": ev,
        "export": {"path": str(export_dir)},
        "generate": {"prompt": prompt, "completion": completion, "temperature": 0.7, "top_k": 50,
                     "seed": cfg.train.seed},
        "serve": serve_and_call(export_dir, prompt, max_tokens=48, seed=cfg.train.seed),
        "wall_s": time.perf_counter() - t0,
    }
    return _write_summary(run_dir, summary, "FLOPs/token = 6*N_active + 12*L*H*head_dim*T")
