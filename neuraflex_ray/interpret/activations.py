"""A model's activations at named sites (the family's `activation_sites`), for sparse autoencoders and
representation comparisons: in process, and as a Ray Data batch-inference job writing Parquet shards.

What a unit and a row are is the family's (`Family.activation_rows`): for an LM, a token block and one
input position of it (the site's output there, context tokens 0..t of the same block), keeping the
token so that a feature can be read back in its text; for NeuroFM, a window and one latent token.
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
    writes each shard's activations at one site (units [start, stop) of the split, as the family's
    `activation_rows` reads them) to `out_dir/shard-NNNNN.parquet`."""

    def __init__(self, export: str, site: str, split: str, out_dir: str, threads: int = 1):
        from neuraflex_ray.checkpoint import export_family, load_exported

        torch.set_num_threads(threads)
        self.model, self.meta = load_exported(export)
        self.family = export_family(export)
        (self.site,) = sites_of(self.family, self.model, [site]).values()
        self.split, self.out = split, Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, rows = [], []
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            cols = self.family.activation_rows(self.model, self.site, self.meta, self.split, int(start), int(stop))
            table = pa.table({"activation": vector_column(np.asarray(cols.pop("activation"), np.float32)),
                              **{k: pa.array(v) for k, v in cols.items()}})
            name = f"shard-{int(shard):05d}.parquet"
            pq.write_table(table, self.out / name)
            names.append(name)
            rows.append(table.num_rows)
        return {"shard": np.asarray(batch["shard"]), "file": np.asarray(names), "rows": np.asarray(rows)}


def collect_activations(export_dir: str | Path, site: str, split: str, out_dir: str | Path, *, max_blocks: int = 0,
                        shard_blocks: int = 256, actors: int = 2) -> dict[str, Any]:
    """Activations of an export at `site` over its own dataset's `split` (train | val; the units are an
    LM's token blocks or NeuroFM's windows), written whole or not at all to out_dir (shards +
    manifest.json); returns the manifest."""
    from neuraflex_ray.checkpoint import export_family, load_exported, read_export_meta

    export, out = Path(export_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    meta = read_export_meta(export)
    family = export_family(export)
    model, _ = load_exported(export)
    sites_of(family, model, [site])  # an unknown site fails here, before any work
    if split not in ("train", "val"):
        raise ConfigError(f"--data {split!r}: use train or val (the export's own split)")
    t0 = time.perf_counter()
    units = family.activation_units(export, meta, split)
    units = min(units, max_blocks) if max_blocks else units
    specs = [{"shard": i, "start": a, "stop": min(a + shard_blocks, units)}
             for i, a in enumerate(range(0, units, shard_blocks))]
    if not specs:
        raise ConfigError(f"--data {split}: the export's dataset holds no {split} units")
    with atomic_dir(out) as tmp:
        written = (ray.data.from_items(specs, override_num_blocks=len(specs))
                   .map_batches(ActivationWriter, batch_size=1, concurrency=min(actors, len(specs)), num_cpus=1,
                                fn_constructor_kwargs={"export": str(export), "site": site, "split": split,
                                                       "out_dir": str(tmp)})
                   .take_all())
        files = [r["file"] for r in sorted(written, key=lambda r: r["shard"])]
        manifest = {"format_version": FORMAT_VERSION, "export": str(export), "site": site, "split": split,
                    "data": (meta.get("data") or {}).get("output_dir"), "rows": int(sum(r["rows"] for r in written)),
                    "blocks": int(units), "model_type": family.name,
                    "width": int(pq.read_schema(tmp / files[0]).field("activation").type.list_size),
                    "shards": files, "build_s": round(time.perf_counter() - t0, 2),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"[activations] {manifest['rows']} rows of {site} ({split}) -> {out} in {manifest['build_s']:.1f}s", flush=True)
    return manifest


def read_activations(path: str | Path) -> dict[str, np.ndarray]:
    """Every shard of a collected site, in order: activation [n, D], block, position and the family's
    other columns (an LM's token; NeuroFM's recording and start_s)."""
    p = Path(path)
    manifest = json.loads((p / "manifest.json").read_text())
    tables = [pq.read_table(p / f) for f in manifest["shards"]]
    return {"activation": np.concatenate([vector_rows(t.column("activation")) for t in tables]),
            **{c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
               for c in tables[0].column_names if c != "activation"}}
