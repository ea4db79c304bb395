"""A TopK sparse autoencoder (Gao et al. 2024; EleutherAI's `sparsify`) on a model's activations.

    z = TopK(W_enc (x - b_dec) + b_enc)        only the k largest pre-activations stay (then ReLU)
    x_hat = W_dec^T z + b_dec                  decoder rows have unit norm, so a latent's size is its value

The loss is the fraction of variance unexplained (FVU, |x - x_hat|^2 over |x - mean x|^2), plus AuxK:
the latents that have not fired for `dead_after` steps try, with their own top `aux_k`, to explain
what the main reconstruction left (its residual), which gives dead latents a gradient and revives
them. Free of any parallelism: Ray Train wraps it like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SAEConfig:
    flavour: str = "debug"  # the job config's flavour name (one size: the data decides d_in)
    d_in: int = 0  # the width of the activation site (0: taken from the activations' manifest)
    expansion: int = 8  # latents = expansion * d_in
    k: int = 32  # latents active per input (L0)
    aux_k: int = 0  # latents AuxK may use on the residual (0: d_in // 2, as `sparsify`)
    aux_coef: float = 1.0 / 32  # AuxK's weight in the loss (OpenAI's)
    dead_after: int = 200  # a latent silent for this many training steps counts as dead
    # The decoder bias's starting value: the training rows' mean (fit_to_data fills it from the split's
    # manifest; empty: zeros). Latents then start coding deviations from the typical activation, not
    # the mean itself, which a random encoder row meets with a large negative pre-activation for half
    # the latents (sparsify starts from the mean, OpenAI from the geometric median).
    init_b_dec: list[float] = field(default_factory=list)

    @property
    def n_latents(self) -> int:
        return self.expansion * self.d_in


@dataclass
class SAEOutput:
    x_hat: torch.Tensor  # [B, d_in]
    values: torch.Tensor  # [B, k] the kept latents' values (>= 0)
    indices: torch.Tensor  # [B, k] which latents
    fvu: torch.Tensor  # scalar
    aux: torch.Tensor  # scalar (0 when no latent is dead)
    aux_coef: float

    @property
    def loss(self) -> torch.Tensor:
        return self.fvu + self.aux_coef * self.aux


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over the batch (1 - explained variance)."""
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(1e-12)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not 0 < cfg.k <= cfg.n_latents:
            raise ValueError(f"sae.k={cfg.k} must lie in [1, expansion * d_in = {cfg.n_latents}]")
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        self.encoder = nn.Linear(d, n)
        # The decoder starts as the encoder's transpose (rows of unit norm): latents begin as read-write pairs.
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.b_dec = nn.Parameter(torch.tensor(cfg.init_b_dec, dtype=torch.float32) if cfg.init_b_dec else torch.zeros(d))
        nn.init.zeros_(self.encoder.bias)
        self.register_buffer("steps_since_fired", torch.zeros(n, dtype=torch.long))
        self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each decoder row's gradient along the row: with unit-norm rows it only changes
        the norm, which normalize_decoder() undoes after the step (sparsify does the same)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.b_dec))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, k], indices [B, k]) of the k largest latents."""
        return self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return (values.unsqueeze(-1) * self.W_dec[indices]).sum(-2) + self.b_dec

    def dense_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_latents] with zeros where a latent is not among the top k."""
        values, indices = self.encode(x)
        return torch.zeros(x.shape[0], self.cfg.n_latents, dtype=values.dtype, device=x.device).scatter(-1, indices, values)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        x_hat = self.decode(values, indices)
        main = fvu(x, x_hat)
        aux = self._aux_loss(x, x_hat, pre)
        return SAEOutput(x_hat, values, indices, main, aux, self.cfg.aux_coef)

    def _aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        dead = self.steps_since_fired >= self.cfg.dead_after
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        aux_k = min(self.cfg.aux_k or self.cfg.d_in // 2, n_dead)
        masked = pre.masked_fill(~dead, 0.0)  # only dead latents compete
        values, indices = masked.topk(aux_k, dim=-1, sorted=False)
        residual = (x - x_hat).detach()
        e_hat = (values.unsqueeze(-1) * self.W_dec[indices]).sum(-2)
        return fvu(residual, e_hat)

    @torch.no_grad()
    def record_firing(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """After a training step: latents that fired (value > 0) in the batch are alive again."""
        fired = torch.zeros_like(self.steps_since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)

    @torch.no_grad()
    def init_decoder_bias(self, x: torch.Tensor) -> None:
        """b_dec at the data's mean (sparsify uses it; OpenAI the geometric median): the SAE then codes
        deviations from the typical activation."""
        self.b_dec.copy_(x.mean(0))


def train_step(sae: TopKSAE, x: torch.Tensor, opt: torch.optim.Optimizer) -> SAEOutput:
    """One optimiser step with the decoder kept at unit norm and firing recorded."""
    out = sae(x)
    opt.zero_grad()
    out.loss.backward()
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()
    sae.record_firing(out.indices, out.values.detach())
    return out
