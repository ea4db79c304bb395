"""FSDP2 checkpoints (torch.distributed.checkpoint shards), read into full tensors in one process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint.state import DCP_DIR, read_checkpoint_state
from neuraflex_ray.config import JobConfig, get_family


def dcp_complete(root: Path) -> bool:
    """DCP's .metadata (written last, by rank 0) names every shard file; all must exist."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(root)).read_metadata()
    except Exception:  # missing or truncated .metadata: not a checkpoint we can load
        return False
    need: dict[str, int] = {}  # each shard file must reach the end of the last item stored in it
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return bool(need) and all((root / f).is_file() and (root / f).stat().st_size >= n for f, n in need.items())


def consolidate_fsdp(checkpoint_dir: str | Path, adapt: Callable[[torch.nn.Module], Any] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], Any]:
    """Full (unsharded) model weights from an FSDP2/DCP checkpoint, in one process, and the model config.
    `adapt` gives the model the structure training had (a fine-tune's LoRA parametrizations) before the load."""
    import torch.distributed.checkpoint as dcp

    state = read_checkpoint_state(checkpoint_dir)
    cfg = JobConfig.from_dict({"model_type": state["model_type"], "model": state["model_config"]}).model
    model = get_family(state["model_type"]).build_model(cfg)
    if adapt is not None:
        adapt(model)
    # DCP reads into tensors of the full shapes; keys are those get_state_dict saved under "model".
    weights = {"model": model.state_dict()}
    dcp.load(weights, checkpoint_id=str(Path(checkpoint_dir) / DCP_DIR), no_dist=True)
    return weights["model"], cfg
