"""Every on-disk format of a model: training checkpoints, consolidated exports and adapter files.

- `state.py`: a training checkpoint's layout and `train_state.json` (step, data position, model type
  and config, world size), read without an engine; whether a checkpoint is complete.
- `deepspeed.py`: DeepSpeed expert-parallel checkpoints consolidated into the local layout.
- `dcp.py`: FSDP2's torch.distributed.checkpoint shards consolidated into full tensors.
- `export.py`: consolidated exports (`model.safetensors` + `config.json`), written and loaded.
- `adapters.py`: adapter files (LoRA, SVF) and the names an adapted model's parameters take.

Training (train/strategy.py) writes checkpoints with these constants; fine-tuning, evaluation,
serving and the command line read everything through the names below.
"""

from neuraflex_ray.checkpoint.adapters import (
    ADAPTER_FILE,
    ADAPTER_META,
    ADAPTER_SUFFIXES,
    fingerprint,
    plain_name,
    read_adapter,
    read_adapter_meta,
    save_adapter,
)
from neuraflex_ray.checkpoint.dcp import consolidate_fsdp
from neuraflex_ray.checkpoint.deepspeed import consolidate_deepspeed, consolidate_deepspeed_adapter
from neuraflex_ray.checkpoint.export import (
    consolidate,
    export_checkpoint,
    export_consolidated,
    export_family,
    load_exported,
    read_export_meta,
    write_export,
)
from neuraflex_ray.checkpoint.state import (
    CKPT_TAG,
    DCP_DIR,
    DEEPSPEED,
    FSDP,
    TRAIN_STATE,
    checkpoint_model_config,
    is_complete,
    read_checkpoint_state,
    read_train_state,
    write_train_state,
)

__all__ = ["ADAPTER_FILE", "ADAPTER_META", "CKPT_TAG", "DCP_DIR", "DEEPSPEED", "FSDP", "ADAPTER_SUFFIXES", "TRAIN_STATE",
           "checkpoint_model_config", "consolidate", "consolidate_deepspeed", "consolidate_deepspeed_adapter",
           "consolidate_fsdp", "export_checkpoint", "export_consolidated", "export_family", "fingerprint", "is_complete",
           "load_exported", "plain_name", "read_adapter", "read_adapter_meta", "read_checkpoint_state",
           "read_export_meta", "read_train_state", "save_adapter", "write_export", "write_train_state"]
