"""NeuroFM inference, model side: raw streams in, an embedding or forecasts out (no HTTP, no Ray here).

A request is a list of streams, one per modality, each [channels][samples] at its own sampling
rate. Each stream goes through what the training pipeline did to a recording (pipelines/timeseries):

    resample to the modality's training rate (the pipeline's own resample_poly helper)
    -> keep the most recent context_s seconds -> normalise each channel -> channel names to ids

then one window (batch 1) goes through the model. Training normalised with per-session statistics;
a new recording has none, so a window is normalised by its own per-channel mean and std, which are
kept to put forecasts back into the stream's units. JSON bodies arrive as `NeuroRequest`; large
arrays come as Arrow IPC (`parse_arrow`) or a single .npy (`parse_npy`). Every bad input raises
RequestError naming the field, e.g. `streams[1].sampling_rate`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict

from neuraflex_ray.models.neurofm import NeuroFM, SeriesInput, param_count
from neuraflex_ray.serving.errors import RequestError
from pipelines.series_prep import MAX_DENOMINATOR, channel_stats, filter_reach_s, resample, resample_ratio

# The pipeline resamples by up/down = resample_ratio(rate, target), a fraction with terms <= MAX_DENOMINATOR. A
# rate whose ratio that approximates worse than this (e.g. 1500 Hz -> 1 Hz becomes 1/1000) would
# stretch the window in time, so it is refused instead of silently served.
RATE_TOLERANCE = 1e-3
ARROW_COLUMNS = {"modality", "sampling_rate", "data", "channels"}


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


class NeuroStream(BaseModel):
    """One modality of one recording: its most recent samples are used."""

    model_config = ConfigDict(extra="forbid")

    modality: str
    sampling_rate: float  # Hz, of `data`
    # [channels][samples]. parse_arrow/parse_npy store a float ndarray [C, T] here without validation
    # (model_construct): turning megasamples into Python floats and back would cost more than the model.
    data: list[list[float]]
    # Row names. Absent: the rows are all of the modality's known channels, in training order.
    channels: list[str] | None = None


class NeuroRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    streams: list[NeuroStream]
    model: str | None = None  # which deployment; read by the caller, ignored here


# ---------------------------------------------------------------------------------------------
# Binary bodies
# ---------------------------------------------------------------------------------------------


def parse_arrow(body: bytes) -> NeuroRequest:
    """An Arrow IPC *stream* (pa.ipc.new_stream), one row per stream, columns:

    modality string, sampling_rate float64 (any number type), data list<list<float32>> ([channels]
    [samples]; any number type inside), channels list<string> (optional; null = absent).
    A list column, not a fixed-shape tensor: streams of different rates have different shapes.
    """
    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        table.validate(full=True)  # the IPC reader checks little; offsets from a client are untrusted
    except (pa.ArrowException, OSError, ValueError) as e:
        raise RequestError(f"body is not a valid Arrow IPC stream: {e}", "body") from e
    names = set(table.column_names)
    if not {"modality", "sampling_rate", "data"} <= names or not names <= ARROW_COLUMNS:
        raise RequestError(f"Arrow columns {table.column_names}: need modality, sampling_rate, data and optionally "
                           f"channels", "body")
    modality, rate = table.column("modality").to_pylist(), table.column("sampling_rate").to_pylist()
    data = table.column("data").combine_chunks()
    channels = table.column("channels").to_pylist() if "channels" in names else [None] * table.num_rows
    if not _is_list(data.type) or not _is_list(data.type.value_type):
        raise RequestError(f"Arrow column data is {data.type}; send list<list<float32>>", "body")
    if "channels" in names and not (_is_list(table.schema.field("channels").type)
                                    and pa.types.is_string(table.schema.field("channels").type.value_type)):
        raise RequestError(f"Arrow column channels is {table.schema.field('channels').type}; send list<string>", "body")
    streams = []
    for i in range(table.num_rows):
        if not isinstance(modality[i], str):
            raise RequestError("modality is missing", f"streams[{i}].modality")
        if not isinstance(rate[i], int | float):
            raise RequestError("sampling_rate is missing or not a number", f"streams[{i}].sampling_rate")
        streams.append(NeuroStream.model_construct(modality=modality[i], sampling_rate=float(rate[i]),
                                                   data=_arrow_rows(data[i], f"streams[{i}].data"), channels=channels[i]))
    return NeuroRequest.model_construct(streams=streams, model=None)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _arrow_rows(cell: pa.ListScalar, param: str) -> np.ndarray:
    """One list<list<number>> cell -> float32 [C, T]."""
    rows = cell.values  # the channels, a ListArray; None when the cell is null
    if rows is None or len(rows) == 0:
        raise RequestError("data holds no channel", param)
    lengths = rows.value_lengths().to_numpy(zero_copy_only=False)
    if rows.null_count or (lengths != lengths[0]).any():
        raise RequestError(f"data rows differ in length ({sorted(set(lengths.tolist()))}); every channel "
                           f"needs the same number of samples", param)
    flat = rows.flatten()
    if flat.null_count or not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise RequestError(f"data samples must be non-null numbers, got {flat.type} with {flat.null_count} nulls", param)
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(rows), int(lengths[0]))


def parse_npy(body: bytes, modality: str, sampling_rate: float, channels: list[str] | None) -> NeuroRequest:
    """A single .npy array [C, T] (a 1-D array is one channel) of real numbers; the caller passes the
    other fields (query parameters). Errors about them name `streams[0].<field>`."""
    f = io.BytesIO(body)
    try:
        # Read the header first: np.load allocates what the header claims before reading the data, so a
        # 40-byte body claiming a terabyte would be a MemoryError rather than a 400.
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.hasobject or dtype.kind not in "fiu" or len(shape) not in (1, 2):
            raise ValueError(f"need a 1-D or 2-D array of real numbers, got {dtype} of shape {shape}")
        if math.prod(shape) * dtype.itemsize > len(body) - f.tell():
            raise ValueError(f"header says {shape} {dtype}, but the body is only {len(body)} bytes")
        f.seek(0)
        x = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RequestError(f"body is not a valid .npy array: {e}", "body") from e
    stream = NeuroStream.model_construct(modality=modality, sampling_rate=float(sampling_rate),
                                         data=np.atleast_2d(x), channels=channels)
    return NeuroRequest.model_construct(streams=[stream], model=None)


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def training_channels(data: dict[str, Any]) -> dict[str, list[str]]:
    """Modality -> its channel names in training order: as the sessions listed them (sessions sorted,
    files in order), then any id the stats do not name, in id order."""
    out: dict[str, list[str]] = {m: [] for m in data["modalities"]}
    for stats in data.get("norm_stats", {}).values():
        for m, s in stats.items():
            out[m] += [c for c in s["channels"] if c not in out[m]]
    for key in sorted(data["channel_ids"], key=data["channel_ids"].get):
        m, _, c = key.partition(":")  # keys are "modality:channel"; a channel name may hold ':'
        if m in out and c not in out[m]:
            out[m].append(c)
    return out


def card(meta: dict[str, Any]) -> dict[str, Any]:
    """What a model card needs from a NeuroFM export's config.json (no weights are read)."""
    from neuraflex_ray.config import JobConfig

    data = meta["data"]
    cfg = JobConfig.from_dict({"model_type": meta["model_type"], "model": meta["model"]}).model
    with torch.device("meta"):  # shapes only: counts parameters without allocating them
        n_params = param_count(NeuroFM(cfg))
    names = training_channels(data)
    return {
        "model_type": meta["model_type"],
        "modalities": {m: {"sampling_rate": spec["rate"], "channels": names[m], "max_channels": spec["max_channels"],
                           "patch_len": spec["patch_len"]} for m, spec in data["modalities"].items()},
        "context_s": data["context_s"],
        "patch_s": data["patch_s"],
        "horizons_s": list(data["horizons_s"]),
        "embedding_dim": cfg.dim,
        "parameters": n_params,
    }


# ---------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------


@dataclass
class _Window:
    """One stream made into a model input, and what it takes to undo the normalisation."""

    modality: str
    channels: list[str]
    input: SeriesInput
    mean: np.ndarray  # [C] float64, in the stream's units
    std: np.ndarray  # [C]


class NeuroPredictor:
    """Embeddings and forecasts of one window (the most recent context_s seconds) per request.

    Channels are not padded to max_channels: the model takes any count per window, and padded
    channels (id 0) are masked out of attention anyway, so padding would only cost compute.
    """

    def __init__(self, model: NeuroFM, meta: dict[str, Any]):
        if "data" not in meta:
            raise ValueError("not a NeuroFM export: config.json needs the dataset's `data` section (written by "
                             "`neuraflex-ray export` from an FSDP checkpoint)")
        self.model = model.eval()  # no dropout in NeuroFM, but eval() is the contract for inference
        self.data = meta["data"]
        self.layout = self.data["modalities"]  # m -> rate, max_channels, patch_len, context_samples, ...
        cfg = model.cfg
        if list(self.layout) != cfg.modalities or [s["patch_len"] for s in self.layout.values()] != cfg.patch_lens:
            raise ValueError(f"export metadata {list(self.layout)} does not match the model's modalities "
                             f"{cfg.modalities} / patch lengths {cfg.patch_lens}")
        self.channel_ids: dict[str, int] = self.data["channel_ids"]
        self.channels = training_channels(self.data)
        self.horizons_s = [float(h) for h in self.data["horizons_s"]]

    def prepare(self, req: NeuroRequest) -> dict[str, SeriesInput]:
        """Model inputs of one window (batch 1), keyed by modality."""
        return {w.modality: w.input for w in self._windows(req)}

    @torch.no_grad()
    def embed(self, req: NeuroRequest) -> dict[str, Any]:
        windows = self._windows(req)
        emb = self.model.embed({w.modality: w.input for w in windows})[0]
        return {"embedding": emb.double().tolist(), "dim": int(emb.shape[0]),
                "modalities": [m for m in self.model.cfg.modalities if any(w.modality == m for w in windows)],
                "context_s": self.data["context_s"]}

    @torch.no_grad()
    def forecast(self, req: NeuroRequest) -> dict[str, Any]:
        """Per stream, in request order: forecast[c][k] = P samples of channel c for horizon k, in the
        stream's units at the modality's training rate. Horizon k (horizons_s[k] = h) is the patch
        ending h seconds after the context; its first sample lies horizon_start_s[k] after the last
        input sample."""
        windows = self._windows(req)
        out = self.model({w.modality: w.input for w in windows}, decode=True)
        streams = []
        for w in windows:
            spec = self.layout[w.modality]
            p, rate = spec["patch_len"], spec["rate"]
            y = out.forecast[w.modality][0].double().numpy()  # [C, K, P], normalised
            y = y * w.std[:, None, None] + w.mean[:, None, None]
            streams.append({
                "modality": w.modality, "sampling_rate": rate, "channels": w.channels,
                "horizon_start_s": [((k - 1) * p + 1) / rate for k in self.model.cfg.horizon_patches],
                "forecast": y.tolist(),
            })
        return {"horizons_s": self.horizons_s, "streams": streams}

    # -- preprocessing ------------------------------------------------------------------------------

    def _windows(self, req: NeuroRequest) -> list[_Window]:
        if not req.streams:
            raise RequestError("streams is empty; send at least one modality", "streams")
        seen: dict[str, int] = {}
        windows = []
        for i, s in enumerate(req.streams):
            if s.modality not in self.layout:
                raise RequestError(f"unknown modality {s.modality!r}; this model knows {list(self.layout)}",
                                   f"streams[{i}].modality")
            if s.modality in seen:
                raise RequestError(f"modality {s.modality!r} is also streams[{seen[s.modality]}]; send each modality "
                                   f"once, all its channels as rows of one stream", f"streams[{i}].modality")
            seen[s.modality] = i
            windows.append(self._window(i, s))
        return windows

    def _window(self, i: int, s: NeuroStream) -> _Window:
        m, spec = s.modality, self.layout[s.modality]
        target, n_ctx = float(spec["rate"]), int(spec["context_samples"])
        up, down = self._ratio(i, s.sampling_rate, target)
        x = self._samples(i, s.data)
        if len(x) > spec["max_channels"]:  # as many as training windows held; the model never saw more
            raise RequestError(f"{len(x)} {m} channels; the model takes at most {spec['max_channels']}",
                               f"streams[{i}].data")
        names = self._names(i, m, s.channels, len(x))
        # Output sample j of resample_poly lies at input sample j * down / up. Start the slice a whole
        # number k of `down` steps before the last sample, so that output k * up falls exactly on it and
        # the window ends at the last sample the client sent, at any rate.
        k_min = math.ceil((n_ctx - 1) / up)
        need = k_min * down + 1
        if x.shape[1] < need:
            raise RequestError(f"{x.shape[1]} samples at {s.sampling_rate:g} Hz; the model needs at least {need} "
                               f"({self.data['context_s']:g} s at its {target:g} Hz)", f"streams[{i}].data")
        # Resample only the tail, plus the filter's reach so that the window's start is not a filter edge:
        # an hour of 1 kHz data costs what a minute does.
        reach = math.ceil(filter_reach_s(s.sampling_rate, target) * s.sampling_rate / down)
        k = min((x.shape[1] - 1) // down, k_min + reach)
        x = resample(x[:, x.shape[1] - 1 - k * down:], s.sampling_rate, target)[:, k * up - n_ctx + 1: k * up + 1]
        mean, std = channel_stats(x)  # this window's own, with the pipeline's floor for flat channels
        xn = ((x - mean[:, None]) / std[:, None]).astype(np.float32)
        ids = [self.channel_ids[f"{m}:{c}"] for c in names]
        inp = SeriesInput(x=torch.from_numpy(xn)[None], chan=torch.tensor([ids], dtype=torch.int64),
                          present=torch.ones(1, dtype=torch.bool))
        return _Window(modality=m, channels=names, input=inp, mean=mean, std=std)

    @staticmethod
    def _ratio(i: int, rate: float, target: float) -> tuple[int, int]:
        """up/down of the pipeline's resampling from `rate` to `target`, or RequestError."""
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise RequestError(f"sampling_rate={rate}; it must be a positive number of Hz", f"streams[{i}].sampling_rate")
        ratio = resample_ratio(rate, target)
        if ratio == 0 or ratio.numerator > MAX_DENOMINATOR or abs(float(ratio) * rate / target - 1) > RATE_TOLERANCE:
            raise RequestError(f"sampling_rate={rate:g} Hz cannot be resampled to the model's {target:g} Hz (ratio "
                               f"{target / rate:g} is not close to p/q with p, q <= {MAX_DENOMINATOR})",
                               f"streams[{i}].sampling_rate")
        return ratio.numerator, ratio.denominator

    @staticmethod
    def _samples(i: int, data: Any) -> np.ndarray:
        """[C][T] lists or an ndarray -> float [C, T], finite. A float ndarray (Arrow, npy) is not copied:
        only the tail that is used becomes float64, in the resampling."""
        param = f"streams[{i}].data"
        if isinstance(data, np.ndarray):
            x = data if data.dtype.kind == "f" else data.astype(np.float64)
        else:
            lengths = {len(r) for r in data}
            if len(lengths) > 1:
                raise RequestError(f"data rows differ in length ({sorted(lengths)}); every channel needs the same "
                                   f"number of samples", param)
            x = np.asarray(data, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise RequestError(f"data has shape {x.shape}; send [channels][samples] with at least one of each", param)
        if not np.isfinite(x).all():
            c, t = np.argwhere(~np.isfinite(x))[0]
            raise RequestError(f"data[{c}][{t}] is {x[c, t]}; every sample must be finite (interpolate or cut gaps)",
                               param)
        return x

    def _names(self, i: int, m: str, channels: list[str] | None, n_rows: int) -> list[str]:
        """Row names, each known to the model for modality m."""
        known = self.channels[m]
        if channels is None:
            if n_rows != len(known):
                raise RequestError(f"{n_rows} rows without names, but the model knows {len(known)} {m} channels "
                                   f"{known}; name the rows in channels", f"streams[{i}].channels")
            return list(known)
        if len(channels) != n_rows:
            raise RequestError(f"{len(channels)} channel names for {n_rows} rows of data", f"streams[{i}].channels")
        for j, c in enumerate(channels):
            if f"{m}:{c}" not in self.channel_ids:
                raise RequestError(f"unknown {m} channel {c!r}; the model knows {known}", f"streams[{i}].channels[{j}]")
            if c in channels[:j]:
                raise RequestError(f"channel {c!r} is named twice", f"streams[{i}].channels[{j}]")
        return list(channels)
