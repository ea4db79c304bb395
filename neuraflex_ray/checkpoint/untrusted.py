"""Directories a user may have received from someone else (an export, an adapter, a datastore) are
read without pickle: weights are safetensors, metadata JSON, arrays .npy without object dtype.

Unpickling runs whatever code the file names, so a pickle payload in such a directory is refused
with a message rather than skipped: a `pytorch_model.bin` beside our files means someone expected
it to be loaded. A run's own training checkpoints are another matter: their DeepSpeed optimizer
shards and DCP metadata are pickles that only DeepSpeed's and torch's resume paths read, and the
weights this project reads from them go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"})
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # pickle's PROTO opcode + version


class PickleRefused(ValueError):
    """A directory meant to hold only safe formats holds a pickle payload."""


def is_safetensors(path: Path) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= path.stat().st_size


def is_pickle(path: Path) -> bool:
    """A raw pickle (protocol 2-5), or torch.save's zip format (which holds a data.pkl)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in PICKLE_PROTOCOLS:
        return True
    if head[:2] == b"PK" and path.suffix != ".npz":
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(".pkl") for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def refuse_pickles(directory: str | Path, what: str) -> None:
    """Raise PickleRefused naming the first pickle payload under `directory` (`what`: "export", ...)."""
    root = Path(directory)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if f.suffix == ".safetensors" and is_safetensors(f):
            continue
        if f.suffix in PICKLE_SUFFIXES or is_pickle(f):
            raise PickleRefused(
                f"{what} {root}: {f.relative_to(root)} is a pickle payload (torch.save / pickle), and loading one "
                f"runs whatever code it names. This project reads {what}s only as safetensors + JSON: remove the "
                f"file, or convert its tensors with safetensors.torch.save_file in an environment you trust")
