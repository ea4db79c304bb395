"""NeuralFlex-MoE in the Hugging Face layout: export to a stock `transformers` architecture, import back.

    neuraflex-ray export --format hf --export runs/quickstart/export --out hf/       # or --checkpoint
    neuraflex-ray finetune --from-hf hf/ --config jobs/configs/finetune_kjv.yaml

The MoE LM is Mixtral's math when every layer is routed, softmax top-k with the chosen weights
renormalised (k >= 2), no shared expert and no Titans memory: RMSNorm, rotary GQA attention
(with Mixtral's `sliding_window` for `model.attn_window`), SwiGLU experts, tied or untied
embeddings. The dense baseline is Llama (Mistral with a window). What has no stock equivalent is
refused by name (`refusals`), never exported approximately. Sinkhorn exports: it balances only in
training; evaluation and serving route plain top-k, which is Mixtral's router.

Two real differences, handled here:
- Rotary pairs. We rotate (even, odd) dimension pairs of a head; transformers' `rotate_half` pairs
  dimension i with i + head_dim/2. Permuting the query and key projections' output rows within
  each head (evens first, then odds) gives the same attention scores: q.k is unchanged when both
  are permuted alike, and pair i keeps its frequency.
- Expert weights. Ours are stacked [E, d, f] (x @ w); transformers holds experts fused, gate and
  up as one [E, 2f, d] tensor applied as F.linear. The checkpoint is written by `save_pretrained`,
  so its file layout is whatever this pinned transformers writes and reads back.

Our own model section rides along in config.json (`neuraflex_model`), so an import of our export
restores the settings that transformers has no field for (loss weights, capacity, flavour).
`transformers` is imported only here: the export, the import and their tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.checkpoint import load_exported, write_export
from neuraflex_ray.checkpoint.untrusted import refuse_pickles
from neuraflex_ray.config import ConfigError, ModelConfig
from neuraflex_ray.models.moe_lm import ffn_width, moe_layer_ids
from neuraflex_ray.serving.openai_api import CHAT_TEMPLATE_JINJA
from pipelines.text import EOS

HF_MODEL_TYPES = ("mixtral", "llama", "mistral")  # what `import_hf` reads
OURS_KEY = "neuraflex_model"  # our model section, kept in the HF config.json


def refusals(cfg: ModelConfig) -> list[str]:
    """The settings of `cfg` that no stock transformers architecture computes, each naming the field."""
    out = []
    if cfg.memory != "none":
        out.append(f"model.memory={cfg.memory}: no stock architecture has Titans' neural memory")
    if cfg.num_experts > 0:
        if cfg.moe_every != 1:
            out.append(f"model.moe_every={cfg.moe_every}: Mixtral routes every layer (dense layers between "
                       f"routed ones have no stock equivalent here)")
        if cfg.shared_expert_ffn_dim > 0:
            out.append(f"model.shared_expert_ffn_dim={cfg.shared_expert_ffn_dim}: Qwen2-MoE's shared expert is "
                       f"scaled by a learned sigmoid gate; ours is added as is")
        if cfg.router == "aux_free":
            out.append("model.router=aux_free: the balance bias chooses experts on softmax probabilities; "
                       "DeepSeek-V3's bias goes with sigmoid scores")
        if cfg.top_k == 1:
            out.append("model.top_k=1: our top-1 weight is the raw probability; Mixtral renormalises it to 1")
    elif len({ffn_width(cfg, i) for i in range(cfg.n_layers)}) > 1:
        out.append(f"model.moe_every={cfg.moe_every} with num_experts=0: the dense baseline's layers have two "
                   f"widths; Llama has one")
    return out


def _architecture(cfg: ModelConfig) -> str:
    if cfg.num_experts > 0:
        return "mixtral"
    return "mistral" if cfg.attn_window else "llama"


def hf_config(cfg: ModelConfig, eos_id: int) -> Any:
    """The transformers config of the stock architecture that computes what `cfg` does."""
    from transformers import AutoConfig

    arch = _architecture(cfg)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.dim // cfg.n_heads,
                  hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id)
    if arch == "mixtral":
        extra = dict(intermediate_size=cfg.expert_ffn_dim, num_local_experts=cfg.num_experts,
                     num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_weight,
                     sliding_window=cfg.attn_window or None)
    else:
        extra = dict(intermediate_size=ffn_width(cfg, 0), **({"sliding_window": cfg.attn_window} if arch == "mistral" else {}))
    hf = AutoConfig.for_model(arch, **common, **extra)
    setattr(hf, OURS_KEY, dataclasses.asdict(cfg))
    return hf


# ---- weights: our local layout <-> transformers' in-memory layout ---------------------------------------

def _rope_perm(head_dim: int) -> torch.Tensor:
    """Row order that turns our (even, odd) rotary pairs into rotate_half's (i, i + head_dim/2) pairs."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(w: torch.Tensor, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads, cols)[:, perm].reshape(rows, cols)


def _pairs(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """(our name, transformers' name, heads whose rotary rows to permute or 0) of every weight that maps
    one to one; the experts, fused differently on each side, are `to_hf`'s and `from_hf`'s own."""
    pairs = [("tok_embeddings.weight", "model.embed_tokens.weight", 0), ("norm.weight", "model.norm.weight", 0)]
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(o + "attn_norm.weight", h + "input_layernorm.weight", 0),
                  (o + "ffn_norm.weight", h + "post_attention_layernorm.weight", 0),
                  (o + "attn.wq.weight", h + "self_attn.q_proj.weight", cfg.n_heads),
                  (o + "attn.wk.weight", h + "self_attn.k_proj.weight", cfg.n_kv_heads),
                  (o + "attn.wv.weight", h + "self_attn.v_proj.weight", 0),
                  (o + "attn.wo.weight", h + "self_attn.o_proj.weight", 0)]
        if cfg.num_experts > 0:
            pairs.append((o + "ffn.router.weight", h + "mlp.gate.weight", 0))
        else:
            pairs += [(f"{o}ffn.{w}.weight", f"{h}mlp.{n}.weight", 0)
                      for n, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
    return pairs


def _map(src: dict[str, torch.Tensor], pairs: list[tuple[str, str, int]], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    return {dst: _permute_heads(src[name], heads, perm) if heads else src[name] for name, dst, heads in pairs}


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (every name, tied ones included) -> the HF model's state dict."""
    out = _map(state, _pairs(cfg), _rope_perm(cfg.dim // cfg.n_heads)) | {"lm_head.weight": state["output.weight"]}
    for i in moe_layer_ids(cfg):
        w1, w3, w2 = (state[f"layers.{i}.ffn.{n}"].transpose(1, 2) for n in ("w1", "w3", "w2"))
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1).contiguous()
        out[f"model.layers.{i}.mlp.experts.down_proj"] = w2.contiguous()
    return out


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF model's state dict -> ours (the inverse of `to_hf`)."""
    inverse = torch.argsort(_rope_perm(cfg.dim // cfg.n_heads))
    out = _map(hf, [(theirs, ours, heads) for ours, theirs, heads in _pairs(cfg)], inverse)
    if not cfg.tie_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    for i in moe_layer_ids(cfg):
        w1, w3 = hf[f"model.layers.{i}.mlp.experts.gate_up_proj"].transpose(1, 2).chunk(2, dim=2)
        out |= {f"layers.{i}.ffn.w1": w1.contiguous(), f"layers.{i}.ffn.w3": w3.contiguous(),
                f"layers.{i}.ffn.w2": hf[f"model.layers.{i}.mlp.experts.down_proj"].transpose(1, 2).contiguous()}
    return out


# ---- config: transformers' -> ours ----------------------------------------------------------------------

def _unsupported_hf(hf: Any) -> list[str]:
    out = []
    if hf.model_type not in HF_MODEL_TYPES:
        return [f"model_type={hf.model_type!r}: import reads {', '.join(HF_MODEL_TYPES)}"]
    if getattr(hf, "hidden_act", "silu") != "silu":
        out.append(f"hidden_act={hf.hidden_act!r}: our FFN is SwiGLU (silu)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        out.append(f"head_dim={head_dim}: ours is hidden_size / num_attention_heads")
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        out.append(f"rope_parameters.rope_type={rope['rope_type']!r}: ours is plain RoPE (rope_type default)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            out.append(f"{flag}=true: our projections have no bias")
    return out


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Our model section for a transformers config; ConfigError naming each field we cannot compute."""
    problems = _unsupported_hf(hf)
    if problems:
        raise ConfigError("this Hugging Face model cannot be imported: " + "; ".join(problems))
    window = getattr(hf, "sliding_window", None) or 0
    sizes = dict(vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
                 n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                 max_seq_len=hf.max_position_embeddings, tie_embeddings=bool(hf.tie_word_embeddings),
                 rope_theta=float((hf.rope_parameters or {}).get("rope_theta", 10000.0)), norm_eps=hf.rms_norm_eps,
                 attn_window=window, moe_every=1, shared_expert_ffn_dim=0, memory="none")
    if hf.model_type == "mixtral":
        experts = dict(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, expert_ffn_dim=hf.intermediate_size)
    else:  # one dense width: the baseline's rule (top_k x expert_ffn_dim) with k = 1
        experts = dict(num_experts=0, top_k=1, expert_ffn_dim=hf.intermediate_size, dense_ffn_dim=hf.intermediate_size)
    ours = getattr(hf, OURS_KEY, None)
    if isinstance(ours, dict):  # our own export: keep what transformers has no field for (router, loss weights)
        try:
            cfg = ModelConfig(**{**ours, **sizes, **(experts if experts["num_experts"] else {"num_experts": 0})})
        except TypeError:  # written by another version of this project: fall back to transformers' fields
            cfg = None
        if cfg is not None and not refusals(cfg) and all(
                ffn_width(cfg, i) == hf.intermediate_size for i in range(cfg.n_layers) if not cfg.num_experts):
            return cfg
    return ModelConfig(**sizes, **experts, router="softmax_topk")


# ---- directories ----------------------------------------------------------------------------------------

def export_hf(export_dir: Path, out: Path, max_shard_size: str = "5GB") -> Path:
    """An export -> a directory that AutoModelForCausalLM / AutoTokenizer load without trust_remote_code."""
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    model, meta = load_exported(export_dir)
    cfg: ModelConfig = model.cfg
    problems = refusals(cfg)
    if problems:
        raise ConfigError(f"--export {export_dir}: no stock transformers architecture computes this model: "
                          + "; ".join(problems))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(export_dir) / "tokenizer.json"), eos_token=EOS,
                                  pad_token=EOS, model_max_length=cfg.max_seq_len)
    tok.chat_template = CHAT_TEMPLATE_JINJA
    eos_id = tok.convert_tokens_to_ids(EOS)
    config = hf_config(cfg, eos_id)
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_model.load_state_dict(to_hf(model.state_dict(), cfg), strict=True, assign=True)
    if cfg.tie_embeddings:
        hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None,
                                                  max_length=cfg.max_seq_len)
    with atomic_dir(Path(out).resolve()) as tmp:
        hf_model.save_pretrained(tmp, max_shard_size=max_shard_size)
        # The chat template inside tokenizer_config.json (not v5's separate chat_template.jinja), and the
        # fast tokenizer's class under the name every transformers release knows, for other readers.
        tok.save_pretrained(tmp, save_jinja_files=False)
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE_JINJA)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "neuraflex_export.json").write_text(json.dumps(
            {"source": meta.get("source_checkpoint") or str(Path(export_dir).resolve()),  # what it was made from
             "architecture": config.architectures,
             "calibration": meta.get("calibration")}, indent=2))
    return Path(out).resolve()


def import_hf(hf_dir: Path, out: Path) -> Path:
    """A transformers directory of a stock architecture we compute (ours or a user's) -> one of our exports."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file() or not (hf_dir / "tokenizer.json").is_file():
        raise ConfigError(f"--from-hf {hf_dir}: not a Hugging Face model directory (config.json + tokenizer.json)")
    refuse_pickles(hf_dir, "Hugging Face directory")
    hf_cfg = AutoConfig.from_pretrained(hf_dir)
    cfg = model_config_from_hf(hf_cfg)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, config=hf_cfg, dtype=torch.float32, use_safetensors=True)
    state = from_hf(hf_model.state_dict(), cfg)
    source = hf_dir / "neuraflex_export.json"
    calibration = json.loads(source.read_text()).get("calibration") if source.is_file() else None
    meta = {"imported_from_hf": str(hf_dir.resolve()), "hf_model_type": hf_cfg.model_type,
            **({"calibration": calibration} if calibration else {})}
    return write_export(state, cfg, "moe_lm", out, meta, files={"tokenizer.json": hf_dir / "tokenizer.json"})
