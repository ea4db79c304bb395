"""Where fine-tuning plugs into a family's Train task: a mixin for tasks whose job may start from an export.

    class LMTask(FinetuneHooks, Task): ...

With `finetune.from_export` set, the model starts from the export's weights, LoRA adapters go on
after the strategy has wrapped the model (`adapt`), and EWC's penalty is built once the parameters
are placed (`after_setup`); the task adds `penalty()` to its training loss. Without it, every hook
leaves training as it is. The Train loop calls the hooks of whatever task it has; it never imports
this package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FinetuneHooks:
    """Mixed into a `train.task.Task`: uses its `cfg`."""

    cfg: Any
    ewc: Any = None  # fine-tuning with ewc_lambda > 0: finetune/ewc.py's penalty

    def build_model(self) -> nn.Module:
        if self.cfg.finetune.from_export:  # fine-tuning starts from the export's weights
            from neuraflex_ray.checkpoint import load_exported

            return load_exported(self.cfg.finetune.from_export)[0].train()
        return super().build_model()  # type: ignore[misc]

    def adapt(self, model: nn.Module) -> nn.Module:
        """After parallelisation (DeepSpeed) or before sharding (FSDP2): a fine-tune's LoRA adapters."""
        from neuraflex_ray.finetune.setup import adapt_for_finetune

        return adapt_for_finetune(model, self.cfg)

    def after_setup(self, model: nn.Module) -> None:
        """Once the strategy has placed the parameters, before a checkpoint is restored: a fine-tune's EWC
        penalty, anchored at the export's weights. DeepSpeed's engine holds the model as `.module`."""
        from neuraflex_ray.finetune.setup import ewc_for_finetune

        self.ewc = ewc_for_finetune(getattr(model, "module", model), self.cfg)

    def with_penalty(self, loss: torch.Tensor, train: bool) -> torch.Tensor:
        """The training loss plus this rank's share of the EWC penalty (evaluation: the loss alone)."""
        return loss + self.ewc.penalty() if train and self.ewc is not None else loss
