"""NeuralFlex-MoE as a model family: a decoder-only Mixture-of-Experts LM on packed BPE token blocks.

Data: the text pipeline (`pipelines/text.py`). Training: DeepSpeed ZeRO-1/2 with expert parallelism
(`parallel/deepspeed_moe.py` lays the MoE layers out). Export: the consolidated weights, the
tokenizer and a confidence temperature fitted on held-out text. Evaluation: held-out bits per byte
beside a bigram. Serving: the OpenAI-compatible routes. Fine-tuning: full or LoRA, with EWC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuraflex_ray.config import MODEL_FLAVOURS, ConfigError, DataConfig, Family, JobConfig, ModelConfig, model_for_data
from neuraflex_ray.families.moe_lm.task import LMTask
from neuraflex_ray.families.moe_lm.validate import validate_moe_lm
from neuraflex_ray.finetune.lora import TARGETS


class MoELMFamily(Family):
    name = "moe_lm"
    model_config = ModelConfig
    data_config = DataConfig
    flavours = MODEL_FLAVOURS
    strategies = ("deepspeed",)
    task_class = LMTask
    serves = "openai"
    serve_name = "neuraflex-moe"
    finetune_methods = ("full", "lora", "svf")
    lora_targets = TARGETS
    flops_convention = "FLOPs/token = 6*N_active + 12*L*H*head_dim*T"
    interpret_module = "neuraflex_ray.families.moe_lm.interpret"  # activations, labels, spliced losses

    def validate(self, cfg: JobConfig, world: int) -> None:
        validate_moe_lm(cfg, world)

    # ---- data -------------------------------------------------------------------------------
    def build_data(self, data: DataConfig, force: bool = False) -> dict[str, Any]:
        from pipelines.text import build_text_dataset

        return build_text_dataset(data, force=force)

    def open_data(self, output_dir: str) -> tuple[Any, Any]:
        from pipelines.text import load_text_datasets

        train_ds, val_ds, _ = load_text_datasets(output_dir)
        return train_ds, val_ds

    def fit_to_data(self, cfg: JobConfig, manifest: dict[str, Any]) -> ModelConfig:
        if manifest["seq_len"] != cfg.data.seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} but the dataset in {cfg.data.output_dir} was built "
                              f"with {manifest['seq_len']}; rebuild it or use another data.output_dir")
        return model_for_data(cfg.model, manifest)

    def loop_data(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {k: manifest[k] for k in ("val_bytes_per_token", "train_bytes_per_token")}

    # ---- train ------------------------------------------------------------------------------
    def build_model(self, model_cfg: ModelConfig) -> Any:
        from neuraflex_ray.models.moe_lm import MoELM

        return MoELM(model_cfg)

    def activation_sites(self, model: Any) -> dict[str, Any]:
        """Per block i: attn_i (attention's output), ffn_i (the feed-forward's or MoE's output), resid_i (the
        residual stream after the block), and moe_in_i (what a routed MoE layer reads, after its norm)."""
        sites: dict[str, Any] = {}
        for i, block in enumerate(model.layers):
            sites.update({f"attn_{i}": block.attn, f"ffn_{i}": block.ffn, f"resid_{i}": block})
            if block.is_moe:
                sites[f"moe_in_{i}"] = block.ffn_norm
        return sites

    def expert_parallel(self, model: Any, ep_size: int, rank: int) -> Any:
        from neuraflex_ray.parallel.deepspeed_moe import parallelize_deepspeed

        return parallelize_deepspeed(model, ep_size, rank)

    def run_summary(self, cfg: JobConfig) -> dict[str, Any]:
        from neuraflex_ray.models.moe_lm import flops_per_token

        t = cfg.train
        return {"ep_size": t.ep_size, "zero_stage": t.zero_stage,
                "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)}

    # ---- export and evaluation --------------------------------------------------------------
    def export(self, checkpoint: Path, data_dir: Path, out_dir: Path, metadata: dict[str, Any]) -> Path:
        """Weights + the tokenizer it was trained with + the confidence temperature fitted on held-out text;
        config.json names the dataset (`neuraflex-ray inspect` reads its held-out text from there)."""
        from neuraflex_ray.checkpoint import export_consolidated
        from neuraflex_ray.eval.calibration import calibrate_export

        meta = {**metadata, "data": {"output_dir": str(data_dir)}}
        out = export_consolidated(checkpoint, self.name, out_dir, meta, files={"tokenizer.json": data_dir / "tokenizer.json"})
        calibrate_export(out, data_dir)
        return out

    def evaluate(self, export_dir: Path, data_dir: Path) -> dict[str, Any]:
        from neuraflex_ray.eval.lm import evaluate_lm_export

        return evaluate_lm_export(export_dir, data_dir)

    def after_training(self, cfg: JobConfig, result: dict[str, Any], export_dir: Path,
                       prompt: str = "def fibonacci(n):\n") -> dict[str, Any]:
        """Held-out bits/byte beside a bigram, a sampled completion, and one OpenAI request over HTTP to Serve."""
        from neuraflex_ray.serving.deploy import serve_and_call
        from neuraflex_ray.serving.local import generate_text

        ev = self.evaluate(export_dir, Path(cfg.data.output_dir))
        print(f"[eval] held-out bits/byte {ev['val_bits_per_byte']:.4f} vs bigram {ev['bigram_bits_per_byte']:.4f}",
              flush=True)
        completion = generate_text(export_dir, prompt, max_new_tokens=48, temperature=0.7, top_k=50, seed=cfg.train.seed)
        print(f"[generate] {prompt!r} -> {completion!r}", flush=True)
        manifest = result["manifest"]
        return {
            "pipeline": {k: manifest[k] for k in ("train_tokens", "val_tokens", "vocab_size", "seq_len")},
            "train": {k: result[k] for k in ("strategy", "workers", "ep_size", "zero_stage", "steps", "tokens_per_s",
                                             "mfu", "final_loss", "val_loss", "peak_flops_per_worker", "data_wait_frac",
                                             "fwd_bwd_frac", "optimizer_frac", "flops_per_token", "checkpoint")},
            "eval": ev,
            "export": {"path": str(export_dir)},
            "generate": {"prompt": prompt, "completion": completion, "temperature": 0.7, "top_k": 50,
                         "seed": cfg.train.seed},
            "serve": serve_and_call(export_dir, prompt, max_tokens=48, seed=cfg.train.seed),
        }

    def export_hf(self, export_dir: Path, out: Path) -> Path:
        """Mixtral (the dense baseline: Llama, or Mistral with a window); settings without one are refused."""
        from neuraflex_ray.families.moe_lm.hf import export_hf

        return export_hf(export_dir, out)

    def import_hf(self, hf_dir: Path, out: Path) -> Path:
        from neuraflex_ray.families.moe_lm.hf import import_hf

        return import_hf(hf_dir, out)

    # ---- serving and fine-tuning ------------------------------------------------------------
    def load_served(self, name: str, path: Path, options: Any) -> Any:
        from neuraflex_ray.serving.models import load_lm

        return load_lm(name, path, options)

    def generate_text(self, export_dir: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
        from neuraflex_ray.serving.local import generate_text

        return generate_text(export_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed)

    def finetune_config(self, cfg: JobConfig, export: Path, meta: dict[str, Any]) -> JobConfig:
        """The export's model; the new corpus is read with the export's tokenizer (or token ids would not match)."""
        import dataclasses

        if cfg.data.tokenizer == "":
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(export / "tokenizer.json")))
        return dataclasses.replace(cfg, model=ModelConfig(**meta["model"]))

    def fisher_samples(self, data_dir: Path, n: int, rng: Any) -> tuple[Any, Any]:
        from neuraflex_ray.finetune.ewc import lm_fisher_samples

        return lm_fisher_samples(data_dir, n, rng)


FAMILY = MoELMFamily()
