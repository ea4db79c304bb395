"""Training strategies: how one worker wraps the model, steps the optimizer and checkpoints.

The Ray Train loop (`loop.py`) is written once against this small interface; a strategy owns
everything engine-specific. `DeepSpeedStrategy` is ZeRO-1/2 + expert parallelism.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from neuraflex_ray.config import JobConfig

CKPT_TAG = "ds"  # DeepSpeed's sub-directory inside each checkpoint


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms (1-D); tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() de-duplicates tied tensors
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class DeepSpeedStrategy:
    name = "deepspeed"

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.engine: Any = None

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{torch.cuda.current_device()}") if self.cfg.train.use_gpu else torch.device("cpu")

    @property
    def bf16(self) -> bool:
        return self.cfg.train.use_gpu and self.cfg.train.precision in ("auto", "bf16")

    def setup(self, model: nn.Module) -> nn.Module:
        if not self.cfg.train.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # inside the worker: importing it on the driver pulls in CUDA/triton probing
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.utils import groups

        from neuraflex_ray.parallel.deepspeed_moe import DeepSpeedMoE, parallelize_deepspeed

        t = self.cfg.train
        rank = dist.get_rank()
        model = parallelize_deepspeed(model, t.ep_size, rank).to(self.device)
        # Expert parameters get their own optimizer groups: ZeRO reduces them only across the
        # expert-data-parallel group, not the whole world.
        groups_ = split_params_into_different_moe_groups_for_optimizer(param_groups(model, t.weight_decay))
        optimizer = torch.optim.AdamW(groups_, lr=t.lr, betas=(t.beta1, t.beta2))
        ds_config = {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": self.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                    dist_init_required=False)
        moe = next((m for m in model.modules() if isinstance(m, DeepSpeedMoE)), None)
        if moe is not None:
            ep_rank = groups._get_expert_parallel_rank(moe.ds.expert_group_name)
            assert ep_rank == rank % t.ep_size, f"unexpected EP layout: rank {rank} has ep_rank {ep_rank}"
        return self.engine

    def forward(self, tokens: torch.Tensor):
        return self.engine(tokens)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward (DeepSpeed scales by 1/grad_accum_steps itself)."""
        self.engine.backward(loss)
        # DeepSpeed counts micro-batches inside engine.step(): it must run after every backward,
        # and only applies the update at the accumulation boundary (see step()).
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, lr: float) -> float:
        """Apply the update after the last micro-batch's backward; returns the global grad norm."""
        assert self.engine.is_gradient_accumulation_boundary(), "step() called off the accumulation boundary"
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def optimizer_steps(self) -> int:
        return int(self.engine.global_steps)

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Every rank calls this; DeepSpeed writes per-expert model files and per-rank optimizer shards."""
        self.engine.save_checkpoint(str(directory), tag=CKPT_TAG, client_state=client_state)

    def load(self, directory: str | Path) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(str(directory), tag=CKPT_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        return client_state


def build_strategy(cfg: JobConfig) -> DeepSpeedStrategy:
    if cfg.train.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg)
    raise ValueError(f"train.strategy={cfg.train.strategy!r} is not known")
