"""The BLT's config checks: the patching settings, the local and global parts, the byte data, the layout."""

from __future__ import annotations

from pathlib import Path

from neuraflex_ray.config import JobConfig
from neuraflex_ray.config.validate import need
from neuraflex_ray.families.moe_lm.validate import validate_expert_layout, validate_moe_model
from neuraflex_ray.models.blt_patching import PATCHING_MODES


def validate_blt(cfg: JobConfig, world: int) -> None:
    m, d = cfg.model, cfg.data
    _validate_patching(cfg)
    for name in ("dim", "n_heads", "encoder_layers", "decoder_layers", "local_ffn_dim", "hash_buckets", "max_seq_len"):
        need(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    need(m.dim % m.n_heads == 0 and (m.dim // m.n_heads) % 2 == 0,
         f"model.dim={m.dim} must split into model.n_heads={m.n_heads} heads of an even width (rotary positions)")
    need(all(n >= 1 for n in m.hash_ngrams), f"model.hash_ngrams={m.hash_ngrams}: each n-gram length must be >= 1")
    g = m.global_model
    validate_moe_model(g, "model.global_model.")
    need(g.dim % g.n_heads == 0, f"model.global_model.dim={g.dim} must be divisible by its n_heads={g.n_heads}")
    validate_expert_layout(g, cfg.train, world, "model.global_model.")

    need(d.block_bytes >= 2, f"data.block_bytes must be >= 2 (got {d.block_bytes})")
    need(d.block_bytes <= m.max_seq_len,
         f"data.block_bytes={d.block_bytes} is over model.max_seq_len={m.max_seq_len}; lower data.block_bytes or "
         f"raise model.max_seq_len")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    need(d.min_val_documents >= 0, f"data.min_val_documents must be >= 0, got {d.min_val_documents}")
    need(d.entropy_actors >= 1, f"data.entropy_actors must be >= 1 (got {d.entropy_actors})")
    if d.entropy_model == "train":
        need(d.entropy_steps >= 1, f"data.entropy_steps must be >= 1 (got {d.entropy_steps})")
        from neuraflex_ray.config import MODEL_FLAVOURS

        need(d.entropy_flavour in MODEL_FLAVOURS, f"data.entropy_flavour={d.entropy_flavour!r}: use one of "
                                                  f"{sorted(MODEL_FLAVOURS)} (NeuralFlex-MoE's flavours)")
    elif d.entropy_model:
        need((Path(d.entropy_model) / "model.safetensors").is_file(),
             f"data.entropy_model={d.entropy_model}: no model export there; give `train` (a stage of this job) or "
             f"an export of a byte-level LM (model_type moe_lm trained with data.vocab_size=257)")


def _validate_patching(cfg: JobConfig) -> None:
    m, d = cfg.model, cfg.data
    need(m.patching in PATCHING_MODES, f"model.patching={m.patching!r}: use one of {list(PATCHING_MODES)}")
    need(m.patch_size >= 1, f"model.patch_size={m.patch_size}: the target mean bytes per patch must be >= 1")
    need(m.min_patch_bytes >= 1, f"model.min_patch_bytes must be >= 1 (got {m.min_patch_bytes})")
    if m.patching != "static":
        need(m.min_patch_bytes <= m.patch_size,
             f"model.min_patch_bytes={m.min_patch_bytes} is over model.patch_size={m.patch_size}: no patch could be "
             f"as short as the target mean; lower model.min_patch_bytes")
    if m.patching == "entropy":
        need(bool(d.entropy_model),
             "model.patching=entropy needs the entropy model's per-byte entropies: set data.entropy_model=train (a "
             "stage of this job) or the path of a byte-level LM export; or use model.patching=static or space")
        need(m.monotonic or m.threshold >= 0,
             f"model.threshold={m.threshold}: an entropy is >= 0, so a negative global threshold starts a patch at "
             f"every byte; use 0 (fitted to model.patch_size) or a positive value")
    else:
        need(m.threshold == 0 and not m.monotonic,
             f"model.threshold/model.monotonic apply to model.patching=entropy only (it is {m.patching!r}); "
             f"remove them")
