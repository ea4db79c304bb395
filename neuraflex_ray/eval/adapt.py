"""A short adaptation of a pre-trained NeuroFM to masked-channel reconstruction, on TRAINING windows only.

The masked-channel test compares the model with a ridge fitted on the training part of the recording.
`zero_shot` scores the pre-trained model as it is; `adapted` first trains a light head on exactly the
data the ridge saw: the train windows of the full montage (>= MIN_MONTAGE_CHANNELS valid channels).
The rest of the model stays frozen. What trains:

    channel_emb    which electrode is which (the local read finds a channel's neighbours through it)
    decoder        the queries' read of the latents
    local          the queries' read of neighbouring tokens (spatial / temporal)
    spatial_filter the signed interpolation from the other channels' samples
    decoder_norm, recon_head[modality]

Each step hides one random valid channel of every window entirely (samples zeroed, every patch
masked), as the test does, and regresses its samples. The function takes the train arrays and
nothing else, so held-out windows cannot reach it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from neuraflex_ray.eval.common import device_of, info, make_input, valid_channels

ADAPTED = ("channel_emb.", "decoder.", "local.", "spatial_filter.", "decoder_norm.")  # + recon_head.<modality>.


def montage_windows(a: Any, idx: np.ndarray, min_channels: int) -> np.ndarray:
    """The windows of `idx` whose montage has at least min_channels valid channels."""
    return idx[valid_channels(a, idx).sum(1) >= min_channels]


def adapt_masked_channel(model: nn.Module, train: dict[str, Any], manifest: dict, modality: str,
                         idx_train: np.ndarray, *, min_channels: int, steps: int = 300, batch_size: int = 8,
                         lr: float = 1e-3, seed: int = 0) -> tuple[nn.Module | None, dict[str, Any]]:
    """(adapted copy of `model`, what was done), or (None, {"reason"}) when there is nothing to adapt on."""
    if modality not in train:
        return None, {"reason": f"no {modality!r} in the train windows"}
    a = train[modality]
    windows = montage_windows(a, idx_train, min_channels)
    if len(windows) == 0:
        return None, {"reason": f"no train window with >= {min_channels} {modality!r} channels"}
    adapted = copy.deepcopy(model).train()
    prefixes = (*ADAPTED, f"recon_head.{modality}.")
    trainable = []
    for name, p in adapted.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            trainable.append(p)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    _, ctx = info(manifest, modality)
    n_ctx = int(manifest["context_patches"])
    rng = np.random.default_rng(seed)
    device = device_of(adapted)
    losses = []
    for _ in range(steps):
        batch = np.sort(rng.choice(windows, size=min(batch_size, len(windows)), replace=False))
        x = np.array(np.asarray(a.x[batch])[:, :, :ctx], dtype=np.float32)
        chan = np.asarray(a.chan)[batch]
        valid = valid_channels(a, batch)
        rows = np.arange(len(batch))
        # One valid channel per window, uniformly: the rank of a uniform draw among the valid slots.
        slot = np.argmax(np.where(valid, rng.random(valid.shape), -1.0), axis=1)
        y = torch.as_tensor(x[rows, slot].copy(), device=device)
        x[rows, slot] = 0.0
        mask = np.zeros((len(batch), x.shape[1], n_ctx), dtype=bool)
        mask[rows, slot] = True
        out = adapted({modality: make_input(x, chan, np.ones(len(batch), bool), device)},
                      patch_mask={modality: torch.as_tensor(mask, device=device)})
        rec = out.recon[modality].reshape(len(batch), x.shape[1], ctx)[torch.as_tensor(rows), torch.as_tensor(slot)]
        loss = (rec.float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    adapted.eval()
    for p in adapted.parameters():
        p.requires_grad_(True)
    return adapted, {"steps": steps, "batch_size": min(batch_size, len(windows)), "lr": lr, "train_windows": len(windows),
                     "trained_parameters": sum(p.numel() for p in trainable),
                     "what": "channel embeddings + decoder (latent read, local read, norm, recon head); the rest frozen",
                     "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}
