"""Time-series pipeline on Ray Data: recordings -> one clock per session -> normalised windows in Parquet.

    sample sets + data.recordings --> Sources, grouped by session (driver; samples downloaded once)
    sessions --map(prepare_session, series_prep.py)--> per session: read every file (BadRecording -> skipped), resample each
        stream to its modality's rate (resample_poly), place streams on one clock (start_s, or
        cross-correlation for `align_to`), keep the common overlap, split by time (early = train,
        late = held out), per-channel mean/std from the train part, normalise, plan window starts
    driver: on_bad_input=error raises here, before anything is written; channel ids over all sessions;
        window list per split (each split in a seeded permutation) cut into shards
    shards --map_batches(cut windows from the session arrays, shared via the object store)--> rows
        --> train/*.parquet, val/*.parquet
    manifest.json, written last: modalities, layout, channel ids, recordings, skipped files, norm stats

A window is `context_s + max(horizons_s)` seconds and starts on the patch grid, so every modality's
window starts on a whole sample; a window lies wholly on one side of its session's split. The build is
deterministic (sorted sessions, ordered execution, seeded shuffle) and cached by a fingerprint of the
inputs and config. The caller owns Ray: call `ray.init(...)` first. The row layout, which NeuroFM's
task reads (`neuraflex_ray/families/neurofm/task.py`): x_<m> list<float32> [C_m * T_m],
chan_<m> list<int32> [C_m], present_<m> bool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from neuraflex_ray.config import SeriesDataConfig
from pipelines.hard_negatives import hard_negative_order
from pipelines.neuro_samples import sample_sources
from pipelines.neuro_sources import BadRecording, Source, recording_source
from pipelines.series_prep import plan_layout, prepare_session
from pipelines.shards import load_splits, rename_shards, require_manifest, reusable, swap_into_place

FORMAT_VERSION = 4  # bump when the output or the build logic changes: it invalidates old caches
BUILD_HINT = "build_series_dataset or `neuraflex-ray data --model neurofm`"
SHARD_BYTES = 32 << 20  # windows per Parquet shard (one Ray task, one block): about this many bytes uncompressed


def _log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


@dataclasses.dataclass
class SeriesArrays:
    """One modality of a batch of windows."""

    x: np.ndarray  # float32 [B, C_m, T_m]: context then future samples, normalised, zeros where absent
    chan: np.ndarray  # int64 [B, C_m]: channel ids (manifest["channel_ids"]), 0 = padding
    present: np.ndarray  # bool [B]: the modality has data in this window


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_series_dataset(cfg: SeriesDataConfig, *, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) train/val Parquet shards of windows; return the manifest.

    Reuses the existing output when its manifest's fingerprint (inputs + config) matches; `force=True`
    rebuilds. A bad input file raises BadRecording before anything is written (on_bad_input=error), or
    is left out and listed in manifest["skipped"] (on_bad_input=skip).
    """
    t0 = time.perf_counter()
    out = Path(cfg.output_dir).expanduser().resolve()
    plan = plan_layout(cfg)
    sources, skipped = _sources(cfg)
    fingerprint = _fingerprint(cfg, sources)
    if not force and (old := reusable(out, fingerprint)) is not None:
        _log(f"reusing {out} (inputs and config unchanged; force=True rebuilds)")
        return old

    # Ordered execution keeps sessions, windows and shards in the same order run to run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    sessions = _by_session(sources)
    prepared = (
        ray.data.from_items([{"session": s, "sources": json.dumps([dataclasses.asdict(x) for x in srcs])}
                             for s, srcs in sessions.items()], override_num_blocks=max(1, len(sessions)))
        .map(prepare_session, fn_kwargs={"plan": plan})
        .take_all()  # small: a session's normalised arrays are a few MB; the windows are cut later
    )
    metas = [json.loads(r["meta"]) for r in prepared]
    skipped += [s for m in metas for s in m["skipped"]]
    if skipped and cfg.on_bad_input == "error":
        raise BadRecording("\n".join(s["reason"] for s in skipped)
                           + "\n(data.on_bad_input=skip builds without these files and lists them in the manifest)")
    short = [{"name": m["session"], "duration_s": m["short_s"]} for m in metas if "short_s" in m]
    if short:
        _log(f"{len(short)} sessions shorter than one window of {plan['window_s']:g} s left out: "
             f"{', '.join(s['name'] for s in short)}")
    metas = [m for m in metas if m["modalities"]]
    modalities = [m for m in plan["modalities"] if any(m in s["modalities"] for s in metas)]
    if not modalities:
        reasons = [s["reason"] for s in skipped] + [f"session {s['name']!r}: {s['duration_s']:.2f} s, shorter than one "
                                                    f"window" for s in short]
        raise ValueError("no usable recording in data.samples / data.recordings:\n" + "\n".join(reasons))
    channel_ids = _channel_ids(metas, cfg.channel_table)
    layout = {m: plan["modalities"][m] for m in modalities}
    counts = {split: sum(len(m[f"{split}_starts"]) for m in metas) for split in ("train", "val")}
    for split, n in counts.items():
        if n == 0:
            raise ValueError(
                f"the {split} split has no window of {plan['window_s']:g} s (context_s + max(horizons_s)); "
                f"use longer recordings, a smaller data.context_s or data.horizons_s, or a "
                f"{'smaller' if split == 'train' else 'larger'} data.val_fraction")
    _log(f"prepared in {time.perf_counter() - t0:.1f}s: {len(metas)} sessions, modalities {modalities}, "
         f"{len(channel_ids)} channels, "
         f"{counts['train']} train / {counts['val']} val windows, {len(skipped)} files skipped")

    # One copy of every session's arrays in the object store, shared by the window tasks.
    arrays = ray.put({r["session"]: pickle.loads(r["payload"]) for r in prepared if r["payload"]})
    sessions_info = {m["session"]: {"start_s": m["start_s"],
                                    "ids": {k: [channel_ids[f"{k}:{c}"] for c in mod["channels"]]
                                            for k, mod in m["modalities"].items()}} for m in metas}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-build-{uuid.uuid4().hex[:8]}"
    try:
        shards: dict[str, list[str]] = {}
        for split in ("train", "val"):
            windows = [(m["session"], t) for m in metas for t in m[f"{split}_starts"]]
            # Shuffled once, seeded, so a batch read in file order mixes sessions: training batches, and
            # the first eval_batches of the held-out split that training evaluates on.
            rng = np.random.default_rng(cfg.seed + (split == "val"))
            if split == "train" and cfg.hard_negatives > 1:
                windows = hard_negative_order(windows, cfg.hard_negatives, cfg.hop_s, rng)
            else:
                windows = [windows[i] for i in rng.permutation(len(windows))]
            shards[split] = _write_split(windows, tmp, split, arrays, sessions_info, layout)
        manifest = {
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "modalities": layout,
            "context_s": cfg.context_s,
            "patch_s": cfg.patch_s,
            "horizons_s": list(cfg.horizons_s),
            "hop_s": cfg.hop_s,
            "window_s": plan["window_s"],
            "context_patches": plan["context_patches"],
            "horizon_patches": plan["horizon_patches"],
            "channel_ids": channel_ids,
            "n_channel_ids": len(channel_ids) + 1,
            "recordings": [_recording_entry(m) for m in metas],
            "train_windows": counts["train"],
            "val_windows": counts["val"],
            "skipped": skipped,
            "short_sessions": short,
            "rejected_windows": {p: sum(m.get("rejected_windows", {}).get(p, 0) for m in metas) for p in ("train", "val")},
            "norm_stats": {m["session"]: m["norm_stats"] for m in metas},
            "train_shards": shards["train"],
            "val_shards": shards["val"],
            "samples": list(cfg.samples),
            # What built the data: augmentations act on training batches, so they are not part of it.
            "data_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("augment", "batch_by_modality")},
            "output_dir": str(out),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        swap_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {counts['train']} train / {counts['val']} val windows to {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def load_series_datasets(output_dir: str) -> tuple[ray.data.Dataset, ray.data.Dataset, dict[str, Any]]:
    """(train, val, manifest) from a built output_dir; turn numpy batches into arrays with series_batch."""
    return load_splits(output_dir, BUILD_HINT)


def series_batch(batch: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, SeriesArrays]:
    """A Ray Data numpy batch of window rows -> {modality: SeriesArrays}, in manifest order."""
    out = {}
    for m, spec in manifest["modalities"].items():
        x = _stack(batch[f"x_{m}"], np.float32)
        b = x.shape[0]
        out[m] = SeriesArrays(
            x=x.reshape(b, spec["max_channels"], spec["context_samples"] + spec["future_samples"]),
            chan=_stack(batch[f"chan_{m}"], np.int64).reshape(b, spec["max_channels"]),
            present=np.asarray(batch[f"present_{m}"], dtype=bool),
        )
    return out


def read_series(output_dir: str, split: str) -> tuple[dict[str, SeriesArrays], np.ndarray, np.ndarray]:
    """Every row of a split, in stored order, without Ray: ({modality: SeriesArrays}, recordings, start_s)."""
    out = Path(output_dir).expanduser().resolve()
    manifest = require_manifest(out, BUILD_HINT)
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: use 'train' or 'val'")
    tables = [pq.read_table(out / s) for s in manifest[f"{split}_shards"]]
    table = pa.concat_tables(tables) if tables else None
    arrays = {}
    for m, spec in manifest["modalities"].items():
        c, t = spec["max_channels"], spec["context_samples"] + spec["future_samples"]
        if table is None:
            arrays[m] = SeriesArrays(np.zeros((0, c, t), np.float32), np.zeros((0, c), np.int64), np.zeros(0, bool))
            continue
        arrays[m] = SeriesArrays(
            x=_flat(table.column(f"x_{m}")).astype(np.float32, copy=False).reshape(-1, c, t),
            chan=_flat(table.column(f"chan_{m}")).astype(np.int64).reshape(-1, c),
            present=table.column(f"present_{m}").to_numpy().astype(bool),
        )
    if table is None:
        return arrays, np.zeros(0, dtype=object), np.zeros(0, np.float64)
    return (arrays, np.asarray(table.column("recording").to_pylist(), dtype=object),
            table.column("start_s").to_numpy().astype(np.float64))


# --------------------------------------------------------------------------------------------
# Driver side: plan, inputs, fingerprint
# --------------------------------------------------------------------------------------------


def _sources(cfg: SeriesDataConfig) -> tuple[list[Source], list[dict[str, str]]]:
    """Sample sets then data.recordings; a recording whose type is unknown is a skipped file."""
    sources: list[Source] = []
    skipped: list[dict[str, str]] = []
    for name in cfg.samples:
        sources += sample_sources(name, cfg.cache_dir)
    for i, spec in enumerate(cfg.recordings):
        if spec.modality not in cfg.modalities:
            raise ValueError(f"data.recordings[{i}].modality={spec.modality!r} is not one of data.modalities "
                             f"{sorted(cfg.modalities)}")
        try:
            sources.append(recording_source(spec, i))
        except BadRecording as e:
            skipped.append({"file": spec.path, "reason": str(e)})
    return sources, skipped


def _by_session(sources: list[Source]) -> dict[str, list[Source]]:
    """Sources grouped by session (sessions sorted, files in given order), stream names made unique."""
    groups: dict[str, list[Source]] = {}
    for src in sources:
        group = groups.setdefault(src.session, [])
        taken = {s.name for s in group}
        name, k = src.name, 2
        while name in taken:
            name, k = f"{src.name}_{k}", k + 1
        group.append(dataclasses.replace(src, name=name))
    return dict(sorted(groups.items()))


def _fingerprint(cfg: SeriesDataConfig, sources: list[Source]) -> str:
    """Hash of everything that changes the output: the sources (and their files' size, mtime) and config."""
    files = []
    for src in sources:
        st = os.stat(src.path) if os.path.isfile(src.path) else None
        files.append([dataclasses.asdict(src), st.st_size if st else None, st.st_mtime_ns if st else None])
    state = {
        "format_version": FORMAT_VERSION,
        "sources": files,
        "recordings": [dataclasses.asdict(r) for r in cfg.recordings],
        "modalities": {k: dataclasses.asdict(v) for k, v in cfg.modalities.items()},
        **{k: getattr(cfg, k) for k in ("context_s", "horizons_s", "hop_s", "patch_s", "val_fraction",
                                        "on_bad_input", "reject_abs_z", "seed", "channel_table")},
        **({"hard_negatives": cfg.hard_negatives} if cfg.hard_negatives > 1 else {}),  # older builds stay reusable
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _channel_ids(metas: list[dict[str, Any]], table: dict[str, int]) -> dict[str, int]:
    keys = sorted({f"{m}:{c}" for meta in metas for m, mod in meta["modalities"].items() for c in mod["channels"]})
    if not table:
        return {k: i + 1 for i, k in enumerate(keys)}
    new = [k for k in keys if k not in table]
    if new:
        raise ValueError(f"data.channel_table: channels {new} are not in the table (the fine-tuned export's channels: "
                         f"{sorted(table)}); rename them to the export's names in data.recordings[].channels, or "
                         f"leave them out")
    return dict(table)


def _recording_entry(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": meta["session"],
        "modalities": list(meta["modalities"]),
        "channels": {m: mod["channels"] for m, mod in meta["modalities"].items()},
        "start_s": meta["start_s"],
        "duration_s": meta["duration_s"],
        "split_s": meta["split_s"],
        "split_guard_s": meta["split_guard_s"],  # no window within this of the split on either side
        "train_windows": len(meta["train_starts"]),
        "val_windows": len(meta["val_starts"]),
        "rejected_windows": meta.get("rejected_windows", {"train": 0, "val": 0}),
        "streams": meta["streams"],
    }


# --------------------------------------------------------------------------------------------
# Ray task 2: planned windows -> rows of one Parquet shard
# --------------------------------------------------------------------------------------------


def _write_split(windows: list[tuple[str, float]], tmp: Path, split: str, arrays: ray.ObjectRef,
                 sessions: dict[str, Any], layout: dict[str, dict[str, Any]]) -> list[str]:
    """Write one split's windows, in the given order, as tmp/<split>/<split>-00000.parquet ...

    Each shard is one item of a Ray dataset, cut by one task into one block, written as one file.
    """
    row_bytes = sum(4 * spec["max_channels"] * (spec["context_samples"] + spec["future_samples"])
                    for spec in layout.values())
    per_shard = max(1, SHARD_BYTES // row_bytes)
    chunks = [windows[i: i + per_shard] for i in range(0, len(windows), per_shard)]
    (
        ray.data.from_items([{"windows": json.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
        .map_batches(_window_rows, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"arrays": arrays, "sessions": sessions, "layout": layout})
        .write_parquet(str(tmp / split))
    )
    return rename_shards(tmp, split)


def _window_rows(batch: pa.Table, arrays: ray.ObjectRef, sessions: dict[str, Any],
                 layout: dict[str, dict[str, Any]]) -> pa.Table:
    """Ray task: one shard's windows [(session, start from the session start), ...] -> Arrow rows."""
    windows = json.loads(batch.column("windows")[0].as_py())
    data = ray.get(arrays)
    names = np.array([w[0] for w in windows], dtype=object)
    starts = np.array([w[1] for w in windows], dtype=np.float64)
    b = len(windows)
    cols: dict[str, pa.Array] = {
        "recording": pa.array(names.tolist(), pa.string()),
        "start_s": pa.array([sessions[n]["start_s"] + t for n, t in windows], pa.float64()),
    }
    for m, spec in layout.items():
        c, t = spec["max_channels"], spec["context_samples"] + spec["future_samples"]
        x = np.zeros((b, c, t), np.float32)
        chan = np.zeros((b, c), np.int32)
        present = np.zeros(b, bool)
        for name in dict.fromkeys(names):
            if m not in data[name]:
                continue
            rows = np.flatnonzero(names == name)
            a = data[name][m]
            first = np.round(starts[rows] * spec["rate"]).astype(np.int64)  # whole samples: starts are on the patch grid
            x[rows, : len(a)] = a[:, first[:, None] + np.arange(t)].transpose(1, 0, 2)
            chan[rows, : len(a)] = sessions[name]["ids"][m]
            present[rows] = True
        cols[f"x_{m}"] = _list_array(x.reshape(b, c * t))
        cols[f"chan_{m}"] = _list_array(chan)
        cols[f"present_{m}"] = pa.array(present)
    return pa.table(cols)


def _list_array(a: np.ndarray) -> pa.ListArray:
    """[B, L] -> list<...> with B rows of L values (the contract's list<float32> / list<int32>)."""
    b, n = a.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (b + 1) * n, n, dtype=np.int32)), pa.array(a.ravel()))


# --------------------------------------------------------------------------------------------
# Reading rows back
# --------------------------------------------------------------------------------------------


def _stack(col: np.ndarray, dtype: type) -> np.ndarray:
    """A list column of a numpy batch: an object array of rows (stacked), or already 2-D."""
    return (np.stack(col) if col.dtype == object else np.asarray(col)).astype(dtype, copy=False)


def _flat(col: pa.ChunkedArray) -> np.ndarray:
    """All values of a list column, row after row."""
    return col.combine_chunks().flatten().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0)
