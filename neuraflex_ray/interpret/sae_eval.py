"""How good a sparse autoencoder is, on activations it never trained on (SAELens's and OpenAI's measures).

- explained variance (1 - FVU), L0 (active latents per input), the dead fraction (latents that never
  fire over the evaluation set), beside PCA with as many components as the L0, fitted on training rows;
- splicing: the model's own loss with the site's output replaced by the SAE's reconstruction, against
  the clean loss and the loss with the site zeroed. CE-loss score = (zero - spliced) / (zero - clean):
  1 when the reconstruction loses nothing the model uses, 0 when it is as bad as deleting the site.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from neuraflex_ray.models.sae import TopKSAE

BATCH = 4096


@torch.no_grad()
def sae_stats(sae: TopKSAE, x: np.ndarray, batch: int = BATCH) -> dict[str, float]:
    """{"explained_variance", "l0", "dead_frac"} of the SAE on rows x [n, d]."""
    sae.eval()
    sq_err, fired, active = 0.0, torch.zeros(sae.cfg.n_latents, dtype=torch.bool), 0
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mean = xt.mean(0)
    total = float((xt - mean).pow(2).sum())
    for i in range(0, len(xt), batch):
        part = xt[i:i + batch]
        values, indices = sae.encode(part)
        sq_err += float((part - sae.decode(values, indices)).pow(2).sum())
        on = values > 0
        fired[indices[on]] = True
        active += int(on.sum())
    return {"explained_variance": 1.0 - sq_err / max(total, 1e-12), "l0": active / max(len(xt), 1),
            "dead_frac": float((~fired).float().mean()), "rows": len(xt)}


def pca_explained_variance(train: np.ndarray, test: np.ndarray, components: int) -> float:
    """Explained variance on `test` of the top `components` principal directions of `train`."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis = vt[:components]
    centred = test - mean
    recon = centred @ basis.T @ basis
    return float(1.0 - ((centred - recon) ** 2).sum() / max(((test - test.mean(0)) ** 2).sum(), 1e-12))


@contextlib.contextmanager
def spliced(module: torch.nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block the module's output (the first element of a tuple) is replace(output)."""
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def reconstruct_with(sae: TopKSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    def replace(a: torch.Tensor) -> torch.Tensor:
        flat = a.reshape(-1, a.shape[-1]).float()
        return sae.decode(*sae.encode(flat)).reshape(a.shape).to(a.dtype)
    return replace


@torch.no_grad()
def spliced_loss_score(loss_of: Callable[[], float], module: torch.nn.Module, sae: TopKSAE,
                  name: str = "ce") -> dict[str, float | None]:
    """{"<name>_clean", "<name>_sae", "<name>_zero", "<name>_loss_score"} for a model whose held-out loss
    `loss_of()` computes (name "ce": the LM's cross entropy; NeuroFM's "recon" and "forecast"). The score
    is None when zeroing the site barely moves the loss (the gap is then reported on its own: a score
    would divide by almost nothing)."""
    clean = loss_of()
    with spliced(module, reconstruct_with(sae)):
        with_sae = loss_of()
    with spliced(module, torch.zeros_like):
        zero = loss_of()
    gap = zero - clean
    score = (zero - with_sae) / gap if abs(gap) > 1e-3 * max(abs(clean), 1.0) else None
    return {f"{name}_clean": clean, f"{name}_sae": with_sae, f"{name}_zero": zero, f"{name}_loss_score": score}


def identity_sae(d: int) -> TopKSAE:
    """A TopK SAE that reconstructs every input exactly: latents +e_j and -e_j, k = d (for tests)."""
    from neuraflex_ray.models.sae import SAEConfig

    sae = TopKSAE(SAEConfig(d_in=d, expansion=2, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae
