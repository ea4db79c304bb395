"""The LM's side of interpretability (`Family.activation_*`, `spliced_losses`): activations of its own
dataset's token blocks, token kinds as labels, and held-out cross entropy for splicing.

A unit is one token block; a row is one input position of it (the site's output there, with context
tokens 0..t of the same block, as the LM is evaluated).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from neuraflex_ray.config import ConfigError


@functools.lru_cache(maxsize=2)
def _blocks(data_dir: str, split: str) -> np.ndarray:
    from pipelines.shards import read_manifest
    from pipelines.text import load_text_datasets, read_blocks

    if read_manifest(Path(data_dir)) is None:
        raise ConfigError(f"the export's training dataset ({data_dir!r}) is not on disk; rebuild it with "
                          f"`neuraflex-ray data` and the export's config")
    train_ds, val_ds, _ = load_text_datasets(data_dir)
    return read_blocks(train_ds if split == "train" else val_ds)


def _data_dir(meta: dict[str, Any]) -> str:
    data = (meta.get("data") or {}).get("output_dir")
    if not data:
        raise ConfigError("the export's config.json names no dataset; export it again with this version")
    return data


def activation_units(meta: dict[str, Any], split: str) -> int:
    return len(_blocks(_data_dir(meta), split))


def site_outputs(model: Any, sites: dict[str, Any], meta: dict[str, Any], split: str,
                 units: np.ndarray) -> dict[str, np.ndarray]:
    from neuraflex_ray.interpret.activations import lm_activations

    return lm_activations(model, sites, _blocks(_data_dir(meta), split)[units])


def check_comparable(a: Path, b: Path) -> None:
    """Both LMs must read the same tokens: the same tokenizer."""
    if (Path(a) / "tokenizer.json").read_bytes() != (Path(b) / "tokenizer.json").read_bytes():
        raise ConfigError(f"{b}: its tokenizer differs from {a}'s; compare reads the same tokens through both")


def activation_rows(model: Any, site: Any, meta: dict[str, Any], split: str, start: int, stop: int) -> dict[str, Any]:
    blocks = _blocks(_data_dir(meta), split)[start:stop]
    (acts,) = site_outputs(model, {"site": site}, meta, split, np.arange(start, stop)).values()
    per = blocks.shape[1] - 1
    return {"activation": acts, "block": start + np.repeat(np.arange(len(blocks)), per).astype(np.int64),
            "position": np.tile(np.arange(per), len(blocks)).astype(np.int32),
            "token": blocks[:, :-1].reshape(-1).astype(np.int32)}


def activation_labels(export: Path, meta: dict[str, Any], acts: dict[str, np.ndarray]) -> Any:
    """Each row's token kind (its whole block lexed as one text, so a string or comment that spans tokens
    is labelled as such) and, to describe it, the text around the token."""
    from neuraflex_ray.eval.token_kinds import kind_names, kinds_for, token_kinds
    from neuraflex_ray.interpret.features import LabelledRows
    from pipelines.shards import read_manifest
    from pipelines.text import load_tokenizer

    kinds = kinds_for(read_manifest(Path(_data_dir(meta))) or {})
    tok = load_tokenizer(Path(export) / "tokenizer.json")
    pieces = [tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size())]
    order = np.lexsort((acts["position"], acts["block"]))
    block, position, token = acts["block"][order], acts["position"][order], acts["token"][order]
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    first = np.zeros(len(block), np.int64)  # row index of each row's block start
    labels: list[str] = []
    for a, b in zip(starts, np.r_[starts[1:], len(block)], strict=True):
        first[a:b] = a
        labels += token_kinds([pieces[int(t)] for t in token[a:b]], kinds)
    names = kind_names(kinds)
    index = {k: i for i, k in enumerate(names)}

    def text(a: int, b: int) -> str:
        return "".join(pieces[int(t)] for t in token[a:b])

    def describe(row: int, before: int = 24, after: int = 4) -> dict[str, str]:
        s, p = int(first[row]), int(position[row])
        end = s + int(np.searchsorted(block[s:], block[s], side="right"))
        return {"context": f"{text(max(s, row - min(p, before)), row)}«{text(row, row + 1)}»"
                           f"{text(row + 1, min(end, row + 1 + after))}"}

    return LabelledRows(np.asarray(acts["activation"][order], np.float32), np.array([index[k] for k in labels]),
                        names, describe)


def spliced_losses(model: Any, meta: dict[str, Any]) -> dict[str, Callable[[], float]]:
    from neuraflex_ray.eval.lm import heldout_loss

    blocks = _blocks(_data_dir(meta), "val")
    return {"ce": lambda: heldout_loss(model, blocks)}
