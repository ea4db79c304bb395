"""A model's activations at named sites (the family's `activation_sites`), for sparse autoencoders and
representation comparisons: in process, and as a Ray Data batch-inference job writing Parquet shards.

An LM's activation at input position t of a block is the site's output there (the context is tokens
0..t of the same block, as the LM is evaluated); each row keeps its block, position and token so that
a feature can be read back in its text.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from neuraflex_ray.atomic import atomic_dir
from neuraflex_ray.config import ConfigError
from pipelines.shards import vector_column, vector_rows

BATCH_ROWS = 16
FORMAT_VERSION = 1


@contextlib.contextmanager
def recording(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every forward of each module appends its output (the first element of a tuple)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(name: str) -> Any:
        def keep(_module: Any, _inputs: Any, output: Any) -> None:
            seen[name].append((output[0] if isinstance(output, tuple) else output).detach())
        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def sites_of(family: Any, model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    sites = family.activation_sites(model)
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise ConfigError(f"--site {unknown[0]!r}: this model's sites are {sorted(sites)}")
    return {n: sites[n] for n in names}


@torch.no_grad()
def lm_activations(model: torch.nn.Module, sites: dict[str, torch.nn.Module], blocks: np.ndarray,
                   batch_rows: int = BATCH_ROWS) -> dict[str, np.ndarray]:
    """{site: float32 [n * (L - 1), D]}: each site's output at every input position of blocks [n, L]."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {name: [] for name in sites}
    blocks = np.asarray(blocks, dtype=np.int64)
    for i in range(0, len(blocks), batch_rows):
        with recording(sites) as seen:
            model(torch.from_numpy(blocks[i:i + batch_rows, :-1]))
        for name, parts in seen.items():
            (a,) = parts
            out[name].append(a.float().reshape(-1, a.shape[-1]).numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


class ActivationWriter:
    """Ray Data actor (`map_batches(ActivationWriter, batch_size=1, concurrency=...)`): holds the export and
    writes each shard's activations at one site to `out_dir/shard-NNNNN.parquet`."""

    def __init__(self, export: str, site: str, out_dir: str, threads: int = 1):
        from neuraflex_ray.checkpoint import export_family, load_exported

        torch.set_num_threads(threads)
        self.model, _ = load_exported(export)
        self.sites = sites_of(export_family(export), self.model, [site])
        self.site, self.out = site, Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, rows = [], []
        for shard, first, tokens in zip(batch["shard"], batch["first_block"], batch["tokens"], strict=True):
            blocks = np.stack(tokens) if tokens.dtype == object else np.asarray(tokens)
            acts = lm_activations(self.model, self.sites, blocks)[self.site]
            per = blocks.shape[1] - 1
            block = int(first) + np.repeat(np.arange(len(blocks)), per)
            table = pa.table({"activation": vector_column(acts), "block": pa.array(block.astype(np.int64)),
                              "position": pa.array(np.tile(np.arange(per), len(blocks)).astype(np.int32)),
                              "token": pa.array(blocks[:, :-1].reshape(-1).astype(np.int32))})
            name = f"shard-{int(shard):05d}.parquet"
            pq.write_table(table, self.out / name)
            names.append(name)
            rows.append(len(acts))
        return {"shard": np.asarray(batch["shard"]), "file": np.asarray(names), "rows": np.asarray(rows)}


def collect_activations(export_dir: str | Path, site: str, split: str, out_dir: str | Path, *, max_blocks: int = 0,
                        shard_blocks: int = 256, actors: int = 2) -> dict[str, Any]:
    """Activations of an LM export at `site` over its own dataset's `split` (train | val), written whole
    or not at all to out_dir (shards + manifest.json); returns the manifest."""
    from neuraflex_ray.checkpoint import export_family, load_exported, read_export_meta
    from pipelines.shards import read_manifest
    from pipelines.text import load_text_datasets, read_blocks

    export, out = Path(export_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    meta = read_export_meta(export)
    model, _ = load_exported(export)
    sites_of(export_family(export), model, [site])  # an unknown site fails here, before any work
    data = (meta.get("data") or {}).get("output_dir")
    if not data or read_manifest(Path(data)) is None:
        raise ConfigError(f"--export {export}: its training dataset ({data!r}) is not on disk; rebuild it with "
                          f"`neuraflex-ray data` and the export's config")
    if split not in ("train", "val"):
        raise ConfigError(f"--data {split!r}: use train or val (the export's own split)")
    t0 = time.perf_counter()
    train_ds, val_ds, _ = load_text_datasets(data)
    blocks = read_blocks(train_ds if split == "train" else val_ds)
    blocks = blocks[:max_blocks] if max_blocks else blocks
    specs = [{"shard": i, "first_block": a, "tokens": blocks[a:a + shard_blocks]}
             for i, a in enumerate(range(0, len(blocks), shard_blocks))]
    with atomic_dir(out) as tmp:
        written = (ray.data.from_items(specs, override_num_blocks=len(specs))
                   .map_batches(ActivationWriter, batch_size=1, concurrency=min(actors, len(specs)), num_cpus=1,
                                fn_constructor_kwargs={"export": str(export), "site": site, "out_dir": str(tmp)})
                   .take_all())
        files = [r["file"] for r in sorted(written, key=lambda r: r["shard"])]
        manifest = {"format_version": FORMAT_VERSION, "export": str(export), "site": site, "split": split,
                    "data": data, "rows": int(sum(r["rows"] for r in written)), "blocks": int(len(blocks)),
                    "width": int(pq.read_schema(tmp / files[0]).field("activation").type.list_size),
                    "shards": files, "build_s": round(time.perf_counter() - t0, 2),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"[activations] {manifest['rows']} rows of {site} ({split}) -> {out} in {manifest['build_s']:.1f}s", flush=True)
    return manifest


def read_activations(path: str | Path) -> dict[str, np.ndarray]:
    """Every shard of a collected site, in order: activation [n, D], block, position, token."""
    p = Path(path)
    manifest = json.loads((p / "manifest.json").read_text())
    tables = [pq.read_table(p / f) for f in manifest["shards"]]
    return {"activation": np.concatenate([vector_rows(t.column("activation")) for t in tables]),
            **{c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in ("block", "position", "token")}}
