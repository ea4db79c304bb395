"""Weight-only quantisation of NeuralFlex-MoE for serving: int8 per channel, int4 per group.

Every matmul weight is stored quantised: attention (wq, wk, wv, wo), dense and shared SwiGLU, the
routed experts' stacked `[E, in, out]` weights, and the output head with the embedding it is tied
to (one table serves both: an embedding row is an output channel). Router weights and norms stay
fp32: they are tiny, and a routing decision flips on a small error.

- int8: symmetric, one fp32 scale per output channel (`max |w| / 127` over the channel's inputs).
- int4: symmetric, one fp32 scale per group of `INT4_GROUP` inputs of a channel (`max |w| / 7`),
  two values packed per byte.

Each weight becomes a `torch.nn.utils.parametrize` parametrization whose stored tensor is the
quantised one: the model code is unchanged (it reads `linear.weight` or `moe.w1` as before) and
each read dequantises on the fly. So the replica holds a quarter (int8) or about an eighth (int4)
of the weight bytes; activations and accumulation stay fp32 (on CPU a fused int8 kernel measured
~20x slower than dequantise-then-matmul here, so none is used). benchmarks/serve_features.py
measures bytes, held-out bits per byte and tokens/s against fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

MODES = ("int8", "int4")
INT4_GROUP = 32


class Int8Weight(nn.Module):
    """Dequantises an int8 [..., out, in] tensor with per-output-channel scales."""

    def __init__(self, scale: torch.Tensor, transposed: bool):
        super().__init__()
        self.register_buffer("scale", scale)
        self.transposed = transposed  # stored [..., out, in], read as [..., in, out] (experts)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        w = q.to(self.scale.dtype) * self.scale[..., None]
        return w.transpose(-1, -2) if self.transposed else w


class Int4Weight(nn.Module):
    """Dequantises packed int4 [..., out, in/2] bytes with per-group scales [..., out, in/group]."""

    def __init__(self, scale: torch.Tensor, transposed: bool):
        super().__init__()
        self.register_buffer("scale", scale)
        self.transposed = transposed

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        low = (packed & 0x0F).to(torch.int8) - 8
        high = (packed >> 4).to(torch.int8) - 8
        q = torch.stack((low, high), dim=-1).flatten(-2)  # [..., out, in]
        w = (q.to(self.scale.dtype).unflatten(-1, (self.scale.shape[-1], -1)) * self.scale[..., None]).flatten(-2)
        return w.transpose(-1, -2) if self.transposed else w


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (int8 values, fp32 scales [..., out])."""
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-12).float()
    return torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (uint8 with two values per byte [..., out, in/2], fp32 scales [..., out, in/group])."""
    if w.shape[-1] % group:
        raise ValueError(f"int4: a weight's input size {w.shape[-1]} is not a multiple of the group size {group}")
    g = w.float().unflatten(-1, (-1, group))
    scale = (g.abs().amax(-1) / 7).clamp(min=1e-12)
    q = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def _quantize(module: nn.Module, name: str, mode: str, transposed: bool) -> None:
    w = getattr(module, name).detach()
    w = w.transpose(-1, -2) if transposed else w  # channels first: [..., out, in]
    if mode == "int8":
        q, scale = quantize_int8(w)
        param: nn.Module = Int8Weight(scale, transposed)
    else:
        q, scale = quantize_int4(w)
        param = Int4Weight(scale, transposed)
    # The parametrization keeps the quantised tensor as the stored "original"; unsafe: its dtype and
    # shape differ from the weight it stands for.
    with torch.no_grad():
        delattr(module, name)
        module.register_parameter(name, nn.Parameter(q, requires_grad=False))
        parametrize.register_parametrization(module, name, param, unsafe=True)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights, shared tables)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str) -> dict[str, Any]:
    """Quantise `model` (a MoELM) in place; returns {mode, bytes_fp32, bytes, bytes_ratio}."""
    from neuraflex_ray.models.moe import MoE

    if mode not in MODES:
        raise ValueError(f"quantize: {mode!r}; use one of {list(MODES)} (or leave it unset for full precision)")
    before = weight_bytes(model)
    tied = model.output.weight is model.tok_embeddings.weight
    for module in list(model.modules()):
        if isinstance(module, MoE):
            for name in ("w1", "w3", "w2"):
                _quantize(module, name, mode, transposed=True)
        elif isinstance(module, nn.Linear) and module is not model.output and not _is_router(model, module):
            _quantize(module, "weight", mode, transposed=False)
    _quantize(model.output, "weight", mode, transposed=False)
    if tied:  # the embedding reads rows of the same quantised table
        p = model.output.parametrizations.weight
        del model.tok_embeddings.weight
        model.tok_embeddings.register_parameter("weight", p.original)
        parametrize.register_parametrization(model.tok_embeddings, "weight", p[0], unsafe=True)
    after = weight_bytes(model)
    return {"mode": mode, "bytes_fp32": before, "bytes": after, "bytes_ratio": after / before}


def _is_router(model: nn.Module, module: nn.Module) -> bool:
    return any(getattr(m, "router", None) is module for m in model.modules())
