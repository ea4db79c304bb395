"""NeuralFlex-MoE: a decoder-only Mixture-of-Experts language model.

RMSNorm, rotary positions, grouped-query attention through `scaled_dot_product_attention`,
SwiGLU experts with a top-k router every `moe_every` layers (dense SwiGLU elsewhere), optional
shared expert and tied embeddings, and KV-cache generation. Nothing here knows about process
groups, meshes or engines: `neuraflex_ray/parallel/` wraps this model for distributed training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neuraflex_ray.config import ModelConfig
from neuraflex_ray.models.moe import MoE, MoEStats, SwiGLU
from neuraflex_ray.models.routers import uses_aux_loss
from neuraflex_ray.models.titans import MemoryState, NeuralMemory


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D/2], or [B, T, D/2] when rows sit at different positions.
    Rotates (even, odd) pairs."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


@dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding: [B, n_kv_heads, max_len, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    memory: MemoryState | None = None  # the layer's Titans memory (model.memory: titans), per row like k/v

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def move_row(self, dst: int, src: int) -> None:
        """Copy row src (keys, values, memory) over row dst: a scheduler compacting its batch."""
        self.k[dst], self.v[dst] = self.k[src], self.v[src]
        if self.memory is not None:
            self.memory.move_row(dst, src)

    def slot(self, i: int) -> KVCache:
        """Row i as a batch of one (views: writes land in this cache)."""
        return KVCache(self.k[i:i + 1], self.v[i:i + 1], self.memory.slot(i) if self.memory is not None else None)


def visible(q_pos: torch.Tensor, k_len: int, window: int) -> torch.Tensor:
    """Query positions [..., Tq] -> [..., Tq, k_len]: the keys each query attends to, itself and those
    before it, the last `window` positions only when window > 0 (sliding-window attention)."""
    back = q_pos[..., None] - torch.arange(k_len, device=q_pos.device)
    return (back >= 0) & (back < window) if window > 0 else back >= 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.window = cfg.attn_window
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D]
        mask = None
        if isinstance(start_pos, torch.Tensor):
            # Batched decode, one new token per row at its own position (continuous batching).
            # Every row attends over the whole cache length under its own mask: the shapes never
            # depend on where the other rows are, so neither does this row's arithmetic.
            assert cache is not None and t == 1, "per-row positions are for one-token decode steps"
            rows = torch.arange(b, device=x.device)
            cache.k[rows, :, start_pos] = k[:, :, 0]
            cache.v[rows, :, start_pos] = v[:, :, 0]
            k, v = cache.k[:b], cache.v[:b]
            mask = visible(start_pos[:, None], k.shape[2], self.window)[:, None]  # [B, 1, 1, L]
        elif cache is not None:
            end = start_pos + t
            cache.k[:b, :, start_pos:end] = k
            cache.v[:b, :, start_pos:end] = v
            k, v = cache.k[:b, :, :end], cache.v[:b, :, :end]
            if (start_pos > 0 and t > 1) or self.window:
                # New query i sits at absolute position start_pos + i and sees keys up to start_pos + i.
                mask = visible(torch.arange(start_pos, end, device=x.device), end, self.window)
        elif self.window:
            mask = visible(torch.arange(t, device=x.device), t, self.window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


def routed_layer_slots(cfg: ModelConfig) -> list[int]:
    """Layers that hold the routed FFN: every `moe_every`-th, counting from 1."""
    return [i for i in range(cfg.n_layers) if i % cfg.moe_every == cfg.moe_every - 1]


def moe_layer_ids(cfg: ModelConfig) -> list[int]:
    """Layers whose FFN is a routed MoE (none in the dense baseline, `num_experts: 0`)."""
    return routed_layer_slots(cfg) if cfg.num_experts > 0 else []


def ffn_width(cfg: ModelConfig, layer_id: int) -> int:
    """Hidden width of a dense layer's SwiGLU. In the dense baseline (`num_experts: 0`) the layers
    where the MoE would sit get the routed experts' *active* width, top_k x expert_ffn_dim plus the
    shared expert's, so a token meets the same parameters and FLOPs as in the MoE (bar the router)."""
    if cfg.num_experts == 0 and layer_id in routed_layer_slots(cfg):
        return cfg.top_k * cfg.expert_ffn_dim + cfg.shared_expert_ffn_dim
    return cfg.dense_ffn_dim


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id in moe_layer_ids(cfg)
        if self.is_moe:
            self.ffn: nn.Module = MoE(cfg.dim, cfg.expert_ffn_dim, cfg.num_experts, cfg.top_k, cfg.shared_expert_ffn_dim,
                                      cfg.router, cfg.sinkhorn_iters)
        else:
            self.ffn = SwiGLU(cfg.dim, ffn_width(cfg, layer_id))
        # MAG: the long-range memory reads the same normalised input as attention, beside it.
        self.memory = NeuralMemory(cfg.dim, cfg.memory_chunk, cfg.memory_depth) if cfg.memory == "titans" else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                start_pos: int | torch.Tensor, valid: torch.Tensor | None = None,
                live: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """`valid` [B, T] (bool): positions that hold a token; an MoE layer routes only those (padding).
        `live` [B] (bool): in a per-row decode step, the rows whose memory takes in their token."""
        n = self.attn_norm(x)
        mixed = self.attn(n, cos, sin, cache, start_pos)
        if self.memory is not None:
            mixed = mixed + self.memory(n, cache.memory if cache is not None else None, start_pos, live)
        x = x + mixed
        h = self.ffn(self.ffn_norm(x), valid) if self.is_moe and valid is not None else self.ffn(self.ffn_norm(x))
        stats = None
        if self.is_moe:
            h, stats = h
        return x + h, stats


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the pipeline's tokenizer fills it in)")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs, as in GPT-2
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for layer in self.layers:
            for lin in (layer.attn.wq, layer.attn.wk, layer.attn.wv):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(layer.attn.wo.weight, std=out_std)
            if layer.memory is not None:
                layer.memory.init_weights(std, out_std)
            ffn = layer.ffn
            if isinstance(ffn, MoE):
                ffn.init_weights(std, out_std)
                ffn = ffn.shared
            if ffn is not None:
                nn.init.normal_(ffn.w1.weight, std=std)
                nn.init.normal_(ffn.w3.weight, std=std)
                nn.init.normal_(ffn.w2.weight, std=out_std)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None, start_pos: int | torch.Tensor = 0,
                live: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
        """tokens [B, T] -> logits [B, T, V]. With caches, the tokens continue at `start_pos`: an int
        for the whole batch, or a [B] tensor of per-row positions for a one-token decode step, where
        only the rows `live` (default all) advance a Titans memory (the others' rows are placeholders)."""
        h, stats = self.hidden_states(tokens, caches, start_pos, live)
        return self.logits(h), stats

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on hidden_states()'s result: [..., D] -> [..., V]."""
        return self.output(hidden)

    def hidden_states(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                      start_pos: int | torch.Tensor = 0,
                      live: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MoEStats]]:
        """tokens [B, T] -> the final normalised hidden states [B, T, D] that the output layer reads
        (a retrieval memory's keys), with forward()'s arguments."""
        t = tokens.shape[1]
        end = int(start_pos.max()) + t if isinstance(start_pos, torch.Tensor) else start_pos + t
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if isinstance(start_pos, torch.Tensor):
            cos, sin = self.rope_cos[start_pos][:, None], self.rope_sin[start_pos][:, None]  # [B, 1, D/2]
        else:
            cos, sin = self.rope_cos[start_pos:start_pos + t], self.rope_sin[start_pos:start_pos + t]
        h = self.tok_embeddings(tokens)
        stats: list[MoEStats] = []
        for i, layer in enumerate(self.layers):
            h, s = layer(h, cos, sin, caches[i] if caches is not None else None, start_pos, live=live)
            if s is not None:
                stats.append(s)
        return self.norm(h), stats

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        c = self.cfg
        p = self.tok_embeddings.weight
        caches = [KVCache.empty(batch, c.n_kv_heads, max_len or c.max_seq_len, c.dim // c.n_heads, p.dtype, p.device)
                  for _ in range(c.n_layers)]
        for cache, layer in zip(caches, self.layers, strict=True):
            if layer.memory is not None:
                cache.memory = layer.memory.new_state(batch)
        return caches


@dataclass
class LossParts:
    total: torch.Tensor  # what backward() sees
    ce: torch.Tensor  # next-token cross entropy, nats per token
    aux: torch.Tensor  # summed load-balancing loss over MoE layers (trained only by softmax_topk)
    z: torch.Tensor  # summed router z-loss


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, stats: list[MoEStats], cfg: ModelConfig) -> LossParts:
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    aux = sum((s.aux_loss for s in stats), torch.zeros((), device=logits.device))
    z = sum((s.z_loss for s in stats), torch.zeros((), device=logits.device))
    aux_weight = cfg.aux_loss_weight if uses_aux_loss(cfg.router) else 0.0
    total = ce + aux_weight * aux + cfg.z_loss_weight * z
    return LossParts(total=total, ce=ce, aux=aux, z=z)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [..., V] -> the distribution a sampled token is drawn from (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def is_greedy(temperature: float) -> bool:
    return temperature < 1e-5  # a tinier temperature would overflow logits / temperature


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] -> next ids [B]. temperature 0 means greedy."""
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MoELM, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (), seed: int | None = None,
             use_cache: bool = True) -> list[int]:
    """Continue `prompt`; returns the new token ids (without the prompt, without the stop token)."""
    model.eval()
    device = model.tok_embeddings.weight.device
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(prompt))
    if not prompt or max_new_tokens <= 0:
        return []
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else 0)
    ids = torch.tensor([prompt], device=device)
    caches = model.new_caches(1, len(prompt) + max_new_tokens) if use_cache else None
    logits, _ = model(ids, caches, 0)
    out: list[int] = []
    pos = ids.shape[1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        tok = int(nxt.item())
        if tok in stop_ids:
            break
        out.append(tok)
        if len(out) == max_new_tokens:
            break
        if use_cache:
            logits, _ = model(nxt.view(1, 1), caches, pos)
        else:
            logits, _ = model(torch.tensor([prompt + out], device=device))
        pos += 1
    return out


# ---------------------------------------------------------------------------------------------
# Parameter and FLOP accounting (for MFU)
# ---------------------------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters, active parameters per token (the matmul weights a token touches) and the
    routers' share of them.

    Active counts: attention, routers, top_k experts (+ shared) in MoE layers, dense FFNs, the Titans
    memory's parameters, and the output projection (it is a real d x V matmul even when tied). The
    embedding lookup is excluded; so are the memory's per-chunk updates (its FLOPs are not in MFU).
    """
    d, hd = cfg.dim, cfg.dim // cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    expert = 3 * d * cfg.expert_ffn_dim
    shared = 3 * d * cfg.shared_expert_ffn_dim
    moe_layers = moe_layer_ids(cfg)
    dense = sum(3 * d * ffn_width(cfg, i) for i in range(cfg.n_layers) if i not in moe_layers)
    router = len(moe_layers) * d * cfg.num_experts
    norms = (2 * cfg.n_layers + 1) * d
    # Titans: q, k, v, read gate and output projections, W_0 (d x d per MLP layer) and three gates.
    memory = cfg.n_layers * (5 * d * d + cfg.memory_depth * d * d + 3 * (d + 1)) if cfg.memory == "titans" else 0
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = (embed + head + norms + memory + cfg.n_layers * attn + dense + router
             + len(moe_layers) * (cfg.num_experts * expert + shared))
    active = (cfg.vocab_size * d + memory + cfg.n_layers * attn + dense + router
              + len(moe_layers) * (cfg.top_k * expert + shared))
    return {"total": total, "active": active, "router": router}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_active + 6 * L * H * (d_qk + d_v) * T (torchtitan's convention),
    T the keys a query attends to: the sequence, or the attention window when it is shorter."""
    hd = cfg.dim // cfg.n_heads
    span = min(seq_len, cfg.attn_window) if cfg.attn_window > 0 else seq_len
    return 6 * param_counts(cfg)["active"] + 6 * cfg.n_layers * cfg.n_heads * (2 * hd) * span
