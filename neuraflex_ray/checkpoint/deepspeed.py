"""DeepSpeed expert-parallel checkpoints, read in one process with no process group.

DeepSpeed writes the non-expert weights once (`mp_rank_00_model_states.pt`) and every expert of
every MoE layer to its own file, `layer_<moe layer>_expert_<global id>_mp_rank_00_model_states.pt`,
whose keys name the expert as `<layer prefix>.ds.deepspeed_moe.experts.deepspeed_experts.<id>.<weight>`.
Reloading that needs the same `ep_size`; here the per-expert tensors are stacked back into the
local layout (`<layer prefix>.<weight>` of shape [E, ...]), for any `ep_size`. How many experts a
layer has is read from its gate (`<layer prefix>.ds.deepspeed_moe.gate.wg.weight`, [E, d]) in the
main file, so nothing here depends on the model's config.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint.adapters import ADAPTER_SUFFIXES, plain_name
from neuraflex_ray.checkpoint.state import CKPT_TAG, checkpoint_model_config, deepspeed_main_file
from neuraflex_ray.parallel.deepspeed_moe import DS_EXPERT, DS_GATE, to_local_name

EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt$")
# <layer prefix>.<DS_EXPERT>.<global expert id>.<weight, or weight.lora_A|B>
_EXPERT_KEY = re.compile(rf"^(.+)\.{re.escape(DS_EXPERT)}\.(\d+)\.(.+)$")


def _main_module(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The main file's weights by plain name (a LoRA-parametrized weight under its own name)."""
    module = torch.load(deepspeed_main_file(checkpoint_dir), map_location="cpu", weights_only=True, mmap=True)["module"]
    return {plain_name(k): v for k, v in module.items()}


def experts_per_layer(module: dict[str, torch.Tensor]) -> dict[str, int]:
    """{MoE layer prefix: its number of experts}, from the gates' weights in the main file."""
    suffix = "." + DS_GATE
    return {k[: -len(suffix)]: int(v.shape[0]) for k, v in module.items() if k.endswith(suffix)}


def deepspeed_complete(checkpoint_dir: str | Path, world_size: int) -> bool:
    """Every rank's optimizer shard and every expert file of every MoE layer is there."""
    root = Path(checkpoint_dir) / CKPT_TAG
    shards = all((root / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file() for r in range(world_size))
    n_expert_files = sum(1 for f in root.iterdir() if EXPERT_FILE.match(f.name))
    return shards and n_expert_files == sum(experts_per_layer(_main_module(checkpoint_dir)).values())


def _stacked_experts(checkpoint_dir: str | Path, counts: dict[str, int], keep: Callable[[str], bool],
                     every_layer: bool) -> dict[str, torch.Tensor]:
    """The expert tensors whose name inside the expert (`w1`, `w1.lora_A`, ...) `keep` accepts, stacked
    per layer into [E, ...] under `<layer prefix>.<name>`. `every_layer`: each MoE layer must have some."""
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in (Path(checkpoint_dir) / CKPT_TAG).iterdir():
        if not EXPERT_FILE.match(f.name):
            continue
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            m = _EXPERT_KEY.match(plain_name(k))
            if m and keep(m.group(3)):
                per_expert.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
    missing = sorted(set(counts) - {layer for layer, _ in per_expert})
    if every_layer and missing:
        raise FileNotFoundError(f"{checkpoint_dir}: no expert files for MoE layer {missing[0]}")
    out = {}
    for (layer, name), tensors in per_expert.items():
        n = counts[layer]
        if sorted(tensors) != list(range(n)):
            have = sorted(tensors)
            raise FileNotFoundError(f"{checkpoint_dir}: {layer}.{name} has experts {have[:8]}"
                                    f"{'...' if len(have) > 8 else ''} of {n}: an expert file is missing")
        out[f"{layer}.{name}"] = torch.stack([tensors[e] for e in range(n)])
    return out


def consolidate_deepspeed(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Merge a DeepSpeed MoE checkpoint (any ep_size) into one local-layout state dict and its model config."""
    module = _main_module(checkpoint_dir)
    state = {to_local_name(k): v for k, v in module.items() if DS_EXPERT not in k}
    counts = experts_per_layer(module)
    state.update(_stacked_experts(checkpoint_dir, counts, lambda w: not w.endswith(ADAPTER_SUFFIXES), every_layer=True))
    assert not any(DS_GATE in k for k in state)
    return state, checkpoint_model_config(checkpoint_dir)


def consolidate_deepspeed_adapter(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a DeepSpeed checkpoint (any ep_size), in the local layout."""
    module = _main_module(checkpoint_dir)
    state = {to_local_name(k): v for k, v in module.items() if k.endswith(ADAPTER_SUFFIXES) and DS_EXPERT not in k}
    counts = experts_per_layer(module)
    state.update(_stacked_experts(checkpoint_dir, counts, lambda w: w.endswith(ADAPTER_SUFFIXES), every_layer=False))
    return state
