"""The Byte Latent Transformer as a model family (Project NEAT's BLT): raw bytes in, no tokenizer.

Data (`data.py`): a corpus the text pipeline reads becomes byte blocks in Parquet; a byte-level LM's
per-byte entropies, scored by Ray Data actors, are written beside them. That entropy model is trained
first, as a stage of the same job (`entropy_stage.py`, `data.entropy_model: train`), or given as an
export. Before training, `fit.py` fits the entropy threshold to the target patch size and measures the
mean patch size on the training split. Training (`task.py`): patches are cut as batches are read;
DeepSpeed lays out the global transformer's MoE layers for expert parallelism exactly as it does the
LM's. Export: the weights, and the entropy model beside them (generation decides patches with it).
Evaluation (`eval/blt.py`): held-out bits per byte beside a bigram fitted on the training bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuraflex_ray.config import Family, JobConfig
from neuraflex_ray.config.blt import BLT_FLAVOURS, BLTConfig, ByteDataConfig
from neuraflex_ray.families.blt.task import BLTTask
from neuraflex_ray.families.blt.validate import validate_blt

ENTROPY_DIR = "entropy_model"  # where an export keeps its entropy model (an moe_lm export of its own)


class BLTFamily(Family):
    name = "blt"
    model_config = BLTConfig
    data_config = ByteDataConfig
    flavours = BLT_FLAVOURS
    strategies = ("deepspeed",)
    task_class = BLTTask
    serves = "openai"  # the completions and chat routes; a token is a byte (serve.py)
    serve_name = "neuraflex-blt"
    flops_convention = ("training FLOPs/byte = 3 x forward matmul and attention FLOPs of the local encoder, pooling, "
                        "global transformer (every padded patch slot), reading, local decoder and head, per block "
                        "/ block_bytes (models/blt.forward_flops)")

    def validate(self, cfg: JobConfig, world: int) -> None:
        validate_blt(cfg, world)

    # ---- data -------------------------------------------------------------------------------
    def build_data(self, data: ByteDataConfig, force: bool = False) -> dict[str, Any]:
        from neuraflex_ray.families.blt.data import build_byte_dataset

        return build_byte_dataset(data, force=force)

    def open_data(self, output_dir: str) -> tuple[Any, Any]:
        from neuraflex_ray.families.blt.data import load_byte_datasets

        train_ds, val_ds, _ = load_byte_datasets(output_dir)
        return train_ds, val_ds

    def fit_to_data(self, cfg: JobConfig, manifest: dict[str, Any]) -> BLTConfig:
        from neuraflex_ray.families.blt.fit import fit_patching

        return fit_patching(cfg, manifest)

    def loop_data(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {k: manifest[k] for k in ("train_bytes_per_token", "val_bytes_per_token")}

    # ---- train ------------------------------------------------------------------------------
    def build_model(self, model_cfg: BLTConfig) -> Any:
        from neuraflex_ray.models.blt import BLT

        return BLT(model_cfg)

    def expert_parallel(self, model: Any, ep_size: int, rank: int) -> Any:
        """The global transformer's MoE layers go expert-parallel; the local parts are dense (data parallel)."""
        from neuraflex_ray.parallel.deepspeed_moe import parallelize_deepspeed

        parallelize_deepspeed(model.global_layers, ep_size, rank)
        return model

    def run_summary(self, cfg: JobConfig) -> dict[str, Any]:
        from neuraflex_ray.families.blt.accounting import model_accounting

        return {"ep_size": cfg.train.ep_size, "zero_stage": cfg.train.zero_stage,
                **model_accounting(cfg.model, cfg.data.block_bytes)}

    # ---- export and evaluation --------------------------------------------------------------
    def export(self, checkpoint: Path, data_dir: Path, out_dir: Path, metadata: dict[str, Any]) -> Path:
        """The weights, and the entropy model whose entropies decided the patches (generation needs it)."""
        from neuraflex_ray.checkpoint import export_consolidated
        from pipelines.shards import require_manifest

        manifest = require_manifest(data_dir, "the BLT's job (its data section), or `neuraflex-ray data --config ...`")
        files = {}
        if manifest.get("entropy_model"):
            source = Path(manifest["entropy_model"])
            files = {f"{ENTROPY_DIR}/{name}": source / name for name in ("model.safetensors", "config.json",
                                                                         "tokenizer.json")}
        meta = {**metadata, "data": {"output_dir": str(data_dir), "block_bytes": manifest["block_bytes"]},
                "entropy_model": ENTROPY_DIR if files else ""}
        return export_consolidated(checkpoint, self.name, out_dir, meta, files=files)

    def evaluate(self, export_dir: Path, data_dir: Path) -> dict[str, Any]:
        from neuraflex_ray.eval.blt import evaluate_blt_export

        return evaluate_blt_export(export_dir, data_dir)

    def after_training(self, cfg: JobConfig, result: dict[str, Any], export_dir: Path,
                       prompt: str = "def fibonacci(n):\n") -> dict[str, Any]:
        """Held-out bits/byte beside a bigram, a sampled completion, and one OpenAI request over HTTP to Serve."""
        from neuraflex_ray.serving.deploy import serve_and_call

        ev = self.evaluate(export_dir, Path(cfg.data.output_dir))
        lo, hi = ev["val_bits_per_byte_ci95"]
        print(f"[eval] held-out bits/byte {ev['val_bits_per_byte']:.4f} (95% CI {lo:.4f}-{hi:.4f} over "
              f"{ev['val_documents']} documents) vs bigram {ev['bigram_bits_per_byte']:.4f}; "
              f"{ev['mean_patch_bytes_val']:.2f} bytes per patch", flush=True)
        # 96 bytes, or what the context leaves after the prompt and the <|endoftext|> it continues from.
        n = max(1, min(96, cfg.data.block_bytes - len(prompt.encode()) - 1))
        completion = self.generate_text(export_dir, prompt, n, temperature=0.7, top_k=50, seed=cfg.train.seed)
        print(f"[generate] {prompt!r} -> {completion!r}", flush=True)
        manifest = result["manifest"]
        return {
            "pipeline": {k: manifest[k] for k in ("train_blocks", "val_blocks", "block_bytes", "val_documents",
                                                  "entropy_model")},
            "train": {k: result[k] for k in ("strategy", "workers", "ep_size", "zero_stage", "steps", "bytes_per_s",
                                             "mfu", "final_loss", "val_loss", "flops_per_byte", "mean_patch_bytes",
                                             "params", "checkpoint")},
            "eval": ev,
            "export": {"path": str(export_dir)},
            "generate": {"prompt": prompt, "completion": completion, "temperature": 0.7, "top_k": 50,
                         "seed": cfg.train.seed},
            "serve": serve_and_call(export_dir, prompt, max_tokens=n, seed=cfg.train.seed),
        }

    # ---- serving ----------------------------------------------------------------------------
    def load_served(self, name: str, path: Path, options: Any) -> Any:
        from neuraflex_ray.families.blt.serve import load_blt

        return load_blt(name, path, options)

    def generate_text(self, export_dir: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
        from neuraflex_ray.families.blt.serve import generate_text

        return generate_text(Path(export_dir), prompt, max_new_tokens, temperature, top_k, top_p, seed)


FAMILY = BLTFamily()
