"""The layout of a training checkpoint, and what it says about itself without an engine.

A training checkpoint is one directory per report, written by every rank through the strategy:

    train_state.json   step, data position (epoch, samples_in_epoch), model_type, strategy,
                       world_size and the model config: readable without loading any weights
    ds/                DeepSpeed (strategy deepspeed): mp_rank_00_model_states.pt (non-expert weights),
                       one layer_<moe layer>_expert_<id>_..._model_states.pt per expert per MoE layer,
                       one zero_pp_rank_<rank>_..._optim_states.pt per rank (deepspeed.py here)
    dcp/               torch.distributed.checkpoint shards + .metadata (strategy fsdp; dcp.py here)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.atomic import write_json_atomic
from neuraflex_ray.config import DEFAULT_MODEL_TYPE, JobConfig

TRAIN_STATE = "train_state.json"
CKPT_TAG = "ds"  # DeepSpeed's sub-directory inside each checkpoint
DCP_DIR = "dcp"  # torch.distributed.checkpoint's sub-directory inside each FSDP checkpoint
DEEPSPEED, FSDP = "deepspeed", "fsdp"  # the `strategy` a checkpoint records: which engine wrote it


def write_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Rank 0 only: the data position and model config, readable without loading any weights."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        write_json_atomic(Path(directory) / TRAIN_STATE, state)


def read_train_state(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / TRAIN_STATE).read_text())


def deepspeed_main_file(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / CKPT_TAG / "mp_rank_00_model_states.pt"


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """What train stored beside the weights: step, data position, model type and config, world size."""
    p = Path(checkpoint_dir)
    if (p / TRAIN_STATE).is_file():
        return read_train_state(p)
    main = deepspeed_main_file(p)  # a DeepSpeed checkpoint written before train_state.json existed
    if not main.is_file():
        raise FileNotFoundError(f"{p / TRAIN_STATE} not found: is {checkpoint_dir} a checkpoint written by train?")
    state = torch.load(main, map_location="cpu", weights_only=True, mmap=True)
    out = {k: state[k] for k in ("step", "epoch", "samples_in_epoch", "model_config")}
    return {**out, "model_type": DEFAULT_MODEL_TYPE, "strategy": DEEPSPEED, "world_size": state["dp_world_size"]}


def checkpoint_model_config(checkpoint_dir: str | Path) -> Any:
    """The model section the checkpoint was trained with, as its family's config class."""
    state = read_checkpoint_state(checkpoint_dir)
    return JobConfig.from_dict({"model_type": state["model_type"], "model": state["model_config"]}).model


def is_complete(checkpoint_dir: str | Path) -> bool:
    """Every rank's shards are there (a crash mid-upload leaves gaps)."""
    from neuraflex_ray.checkpoint.dcp import dcp_complete
    from neuraflex_ray.checkpoint.deepspeed import deepspeed_complete

    try:
        state = read_checkpoint_state(checkpoint_dir)
        if state["strategy"] == FSDP:
            return dcp_complete(Path(checkpoint_dir) / DCP_DIR)
        return deepspeed_complete(checkpoint_dir, state["world_size"])
    except (FileNotFoundError, KeyError, RuntimeError, EOFError, ValueError, OSError):
        return False
