"""The job-level config sections: `train`, `finetune` and the `JobConfig` that holds every section.

`JobConfig.model` and `JobConfig.data` take the section classes of the config's model family
(`model_type`, looked up in `family.py`'s registry): the built-in families' sections are in
`lm.py` and `series.py`. Loading, overrides and type checks live in `load.py`, cross-field checks in
`validate.py` and in each family's own `validate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuraflex_ray.config.family import DEFAULT_MODEL_TYPE, ConfigError, get_family

__all__ = ["ConfigError", "FinetuneConfig", "JobConfig", "TrainConfig"]


@dataclass
class TrainConfig:
    strategy: str = "deepspeed"  # deepspeed (ZeRO + expert parallel, moe_lm) or fsdp (FSDP2 fully_shard)
    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1
    # Where workers land on a cluster. Custom resources per worker (e.g. {"gpu_node": 1}, a resource
    # the cluster YAML gives GPU node types) keep workers off the head node; an accelerator type
    # ("H100", "A100", "L4"...) picks GPU nodes by model; the placement strategy is Ray's:
    # PACK (fewest nodes), SPREAD, STRICT_PACK (one node: NVLink for expert all-to-all), STRICT_SPREAD.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    accelerator_type: str = ""
    placement_strategy: str = "PACK"
    ep_size: int = 2
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # fsdp: recompute each block's activations in backward
    # fsdp: free each block's gathered weights after its forward (gathered again for backward). false
    # keeps them until backward: one all-gather per block per step instead of two, for the memory of
    # the full weights between forward and backward (what ZeRO-2 holds)
    reshard_after_forward: bool = True
    compile: bool = False  # torch.compile each block (train/compile.py); off: faster on CPU for the debug flavours
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 16  # validation micro-batches per rank per evaluation
    log_every: int = 10
    checkpoint_every: int = 100
    # A training split smaller than this on disk is read once into Ray's object store, so epochs,
    # restarts and sweep trials skip the seconds a streaming read takes to start; larger ones stream.
    materialize_train_mb: int = 256
    num_to_keep: int = 2
    max_failures: int = 1  # automatic restarts from the last checkpoint after a worker failure
    seed: int = 0
    resume_from: str = ""  # a run directory (or one checkpoint directory) to continue from
    inject_failure_at_step: int = 0  # testing: the last worker raises once at this step (0: never)


@dataclass
class FinetuneConfig:
    """Continue training from a consolidated export (neuraflex_ray/finetune/). Empty `from_export`: a
    normal training run. The dataset is the job's `data` section (the new corpus)."""

    from_export: str = ""  # the export to start from (`neuraflex-ray export`, or a run's export/)
    # or a Hugging Face transformers directory of an architecture the family imports (`finetune --from-hf`):
    # imported into <run dir>/hf-import, which then is the export the run starts from
    from_hf: str = ""
    # full (every weight trains) | lora (low-rank adapters) | svf (singular-value scales; LM only): the base
    # stays frozen under an adapter (finetune/methods.py)
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapter's first factor, in training
    # the weights an adapter (LoRA or SVF) targets: attention, dense, experts, router (finetune/targets.py)
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "dense", "experts"])
    ewc_lambda: float = 0.0  # > 0: elastic weight consolidation toward the export's weights
    fisher_blocks: int = 64  # samples of the original training data (LM sequences, NeuroFM windows) for the Fisher


@dataclass
class JobConfig:
    name: str = "quickstart"
    output_dir: str = "runs"  # run directory = output_dir/name (TensorBoard, checkpoints, export)
    # The model family (config/family.py): a built-in name, or a plug-in's import path "pkg.module:FAMILY".
    model_type: str = DEFAULT_MODEL_TYPE
    model: Any = None  # the family's model section (None: its defaults)
    data: Any = None  # the family's data section (None: its defaults)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        family = get_family(self.model_type)
        if self.model is None:
            self.model = family.model_config()
        if self.data is None:
            self.data = family.data_config()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Rebuild from `to_dict()` output (used inside Ray workers); no flavour re-application."""
        from neuraflex_ray.config.load import build

        return build(cls, d, "", apply_flavour=False)
