"""Titans' neural long-term memory (Behrouz et al. 2025), as the MAG variant's memory branch.

The memory is a small MLP M_W whose weights W are *state*, not parameters. Every sequence starts
from the learned initial weights W_0; as the sequence is read, chunk by chunk, W takes a gradient
step on the associative loss of the chunk's tokens, sum_t theta_t ||M_W(k_t) - v_t||^2 (the
"surprise"), with momentum and a forgetting gate:

    S_c     = eta_c * S_{c-1} - grad_W sum_{t in c} theta_t ||M_{W_c}(k_t) - v_t||^2
    W_{c+1} = (1 - alpha_c) * W_c + S_c

theta_t (per token), eta_c and alpha_c (per chunk, from the chunk's mean input) are learned gates.
A chunk's rates are a budget: when they sum past 1 they are scaled to sum to 1, so a chunk of
near-identical keys (a run of spaces) cannot take one huge step and blow the memory up, while a
few surprising tokens in a chunk of dull ones keep their full rate; and a row's step (all its
matrices together) is clipped to norm MAX_STEP, as Titans' implementations bound the surprise:
without it a two-layer memory fed one token over and over diverges within a few chunks.
A token of chunk c reads M_{W_c}(q_t): a memory that has taken in every earlier chunk and nothing
of its own chunk or later ones, so the read is causal and a chunk's tokens are read in parallel.

The gradient is written out by hand (the MLP's backward, a few matmuls), so the outer training loss
reaches W_0, the projections and the gates through ordinary autograd: no double backward, and the
DeepSpeed path runs the same arithmetic. State lives in `MemoryState` (one per layer, beside the
KV cache): per row of the batch, nothing shared between rows, and a forward at position 0 starts
it again from W_0, so no sequence ever reads another's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_LR = 0.5  # theta_t's ceiling: with unit keys, 2 * 0.5 * ||k||^2 = 1 writes a linear memory's value in one step
MAX_STEP = 1.0  # the largest Frobenius norm of one chunk's gradient step, per row
MEMORY_DEPTHS = (1, 2)  # 1: a linear associative memory k W; 2: silu(k W1) W2


def memory_read(weights: list[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """M_W(q) per row: weights [B, m, h] (, [B, h, m]), q [B, T, m] -> [B, T, m]."""
    if len(weights) == 1:
        return q @ weights[0]
    return F.silu(q @ weights[0]) @ weights[1]


def memory_grads(weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor) -> list[torch.Tensor]:
    """grad_W sum_t lr_t ||M_W(k_t) - v_t||^2 per row, by hand: k, v [B, C, m], lr [B, C]."""
    if len(weights) == 1:
        err = k @ weights[0] - v
        return [k.transpose(1, 2) @ (2 * lr[..., None] * err)]
    w1, w2 = weights
    h = k @ w1
    s = torch.sigmoid(h)
    a = h * s  # silu(h)
    g_y = 2 * lr[..., None] * (a @ w2 - v)
    g_h = (g_y @ w2.transpose(1, 2)) * (s * (1 + h * (1 - s)))  # silu'(h) = s (1 + h (1 - s))
    return [k.transpose(1, 2) @ g_h, a.transpose(1, 2) @ g_y]


@dataclass
class MemoryState:
    """One layer's memory for a batch of sequences: the weights and momentum per row, and the current
    chunk's keys, values, rates and inputs read so far (`filled` of them per row)."""

    weights: list[torch.Tensor]
    momentum: list[torch.Tensor]
    keys: torch.Tensor  # [B, C, m]
    values: torch.Tensor  # [B, C, m]
    lrs: torch.Tensor  # [B, C]
    inputs: torch.Tensor  # [B, C, d]
    filled: torch.Tensor  # [B] long

    def move_row(self, dst: int, src: int) -> None:
        """Copy row src's memory over row dst's (a scheduler compacting its batch)."""
        for t in (*self.weights, *self.momentum, self.keys, self.values, self.lrs, self.inputs, self.filled):
            t[dst] = t[src]

    def slot(self, i: int) -> MemoryState:
        """Row i as a batch of one (views: writes land in this state)."""
        return MemoryState(*([t[i:i + 1] for t in ts] for ts in (self.weights, self.momentum)),
                           *(t[i:i + 1] for t in (self.keys, self.values, self.lrs, self.inputs, self.filled)))


class NeuralMemory(nn.Module):
    """The memory branch of a layer: reads M_W(q_t) and writes the chunk's (k_t, v_t) into W."""

    def __init__(self, dim: int, chunk: int, depth: int):
        super().__init__()
        if depth not in MEMORY_DEPTHS:
            raise ValueError(f"memory depth {depth} is not built; use one of {MEMORY_DEPTHS}")
        self.chunk = chunk
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.read_gate = nn.Linear(dim, dim, bias=False)  # MAG: the read is gated per channel by the input
        self.wo = nn.Linear(dim, dim, bias=False)
        self.init = nn.ParameterList(nn.Parameter(torch.empty(dim, dim)) for _ in range(depth))  # W_0
        self.lr_gate = nn.Linear(dim, 1)  # theta_t = MAX_LR * sigmoid(.)
        self.momentum_gate = nn.Linear(dim, 1)  # eta_c
        self.forget_gate = nn.Linear(dim, 1)  # alpha_c

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv, self.read_gate):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for w in self.init:
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[0]))
        # Start as a plain memory: half the ceiling's write rate, strong momentum, little forgetting.
        for gate, bias in ((self.lr_gate, 0.0), (self.momentum_gate, 2.0), (self.forget_gate, -4.0)):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, bias)

    def new_state(self, batch: int) -> MemoryState:
        """A state for `batch` sequences, every row at W_0 (`reset`)."""
        w = self.init[0]

        def zeros(*shape: int, dtype: torch.dtype = w.dtype) -> torch.Tensor:
            return torch.zeros(batch, *shape, dtype=dtype, device=w.device)

        dim, c = w.shape[0], self.chunk
        state = MemoryState(weights=[zeros(*p.shape) for p in self.init], momentum=[zeros(*p.shape) for p in self.init],
                            keys=zeros(c, dim), values=zeros(c, dim), lrs=zeros(c), inputs=zeros(c, dim),
                            filled=zeros(dtype=torch.long))
        self.reset(state)
        return state

    @torch.no_grad()
    def reset(self, state: MemoryState) -> None:
        """Every row back to W_0 with no momentum and an empty chunk: a new sequence."""
        for s, w0 in zip(state.weights, self.init, strict=True):
            s.copy_(w0.expand_as(s))
        for m in state.momentum:
            m.zero_()
        state.filled.zero_()

    def update(self, weights: list[torch.Tensor], momentum: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
               lr: torch.Tensor, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One chunk's step: k, v [B, C, m], lr [B, C] (theta, before the budget), x [B, C, d] (the
        chunk's inputs, for its gates)."""
        lr = lr / lr.sum(1, keepdim=True).clamp(min=1.0)  # the chunk's write budget
        mean = x.mean(1)
        eta = torch.sigmoid(self.momentum_gate(mean))[:, :, None]  # [B, 1, 1]
        alpha = torch.sigmoid(self.forget_gate(mean))[:, :, None]
        grads = memory_grads(weights, k, v, lr)
        norm = torch.sqrt(sum(g.pow(2).sum((1, 2)) for g in grads))[:, None, None]
        grads = [g * (MAX_STEP / (norm + 1e-6)).clamp(max=1.0) for g in grads]
        momentum = [eta * s - g for s, g in zip(momentum, grads, strict=True)]
        weights = [(1 - alpha) * w + s for w, s in zip(weights, momentum, strict=True)]
        return weights, momentum

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> unit queries and keys, values, write rates [B, T]."""
        q = F.normalize(self.wq(x), dim=-1)
        k = F.normalize(self.wk(x), dim=-1)
        return q, k, self.wv(x), MAX_LR * torch.sigmoid(self.lr_gate(x)).squeeze(-1)

    def forward(self, x: torch.Tensor, state: MemoryState | None = None, start_pos: int | torch.Tensor = 0,
                live: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d] (the layer's normalised input) -> the gated memory read [B, T, d]. Without a state
        the rows are whole sequences from position 0 (training, evaluation); with one, they continue it
        at `start_pos` (an int, or per-row positions for a one-token decode step, where only the rows
        `live` [B] (bool; default all) write: the others' memory is left as it was)."""
        q, k, v, lr = self.project(x)
        if state is None:
            read = self._whole(q, k, v, lr, x)
        elif isinstance(start_pos, torch.Tensor):
            read = self._decode(state, q, k, v, lr, x, live)
        else:
            read = self._continue(state, start_pos, q, k, v, lr, x)
        return self.wo(torch.sigmoid(self.read_gate(x)) * read)

    def _whole(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        weights = [w.expand(b, *w.shape) for w in self.init]
        momentum = [torch.zeros_like(w) for w in weights]
        reads = []
        for i in range(0, x.shape[1], self.chunk):
            c = slice(i, i + self.chunk)
            reads.append(memory_read(weights, q[:, c]))
            if i + self.chunk <= x.shape[1]:  # a partial last chunk is never written: nothing reads after it
                weights, momentum = self.update(weights, momentum, k[:, c], v[:, c], lr[:, c], x[:, c])
        return torch.cat(reads, 1)

    def _continue(self, state: MemoryState, start_pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  lr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if start_pos == 0:
            self.reset(state)
        reads, i, t = [], 0, x.shape[1]
        while i < t:
            n = int(state.filled[0])
            j = min(t, i + self.chunk - n)
            reads.append(memory_read(state.weights, q[:, i:j]))
            for buf, new in ((state.keys, k), (state.values, v), (state.lrs, lr), (state.inputs, x)):
                buf[:, n:n + j - i] = new[:, i:j]
            state.filled += j - i
            if n + j - i == self.chunk:
                self._write(state, slice(None))
            i = j
        return torch.cat(reads, 1)

    def _decode(self, state: MemoryState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                x: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        """One token per row, each row at its own place in its own chunk (continuous batching). The
        batch may be the state's first rows only (an engine that decodes just its live rows)."""
        read = memory_read([w[:x.shape[0]] for w in state.weights], q)
        rows = torch.arange(x.shape[0], device=x.device) if live is None else live.nonzero().squeeze(1)
        n = state.filled[rows]
        for buf, new in ((state.keys, k), (state.values, v), (state.lrs, lr), (state.inputs, x)):
            buf[rows, n] = new[rows, 0]
        state.filled[rows] += 1
        full = (state.filled[rows] == self.chunk).nonzero().squeeze(1)
        full = rows[full]
        if full.numel():
            self._write(state, full)
        return read

    def _write(self, state: MemoryState, rows: slice | torch.Tensor) -> None:
        """Take the full chunk of `rows` into their weights and start their next chunk."""
        weights, momentum = self.update([w[rows] for w in state.weights], [m[rows] for m in state.momentum],
                                        state.keys[rows], state.values[rows], state.lrs[rows], state.inputs[rows])
        for dst, src in zip(state.weights + state.momentum, weights + momentum, strict=True):
            dst[rows] = src
        state.filled[rows] = 0
