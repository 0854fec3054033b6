"""Text corpora for pretraining: documents from the Python stdlib or local files, in a fixed order.

Sources (`data.source`):
- ``"stdlib"``: the standard library's own ``.py`` files (ships with every Python; no download),
  one document per file, sorted by relative path, without tests, site-packages, idlelib,
  lib2to3, tkinter and turtledemo.
- a ``.txt`` file: one document per paragraph (text between blank lines; leading and trailing
  newlines dropped), so a multi-GB text dump streams instead of loading as one string;
- a ``.jsonl`` / ``.json`` file: field ``text_field`` of each record;
- a ``.parquet`` file: column ``text_field``;
- any of those gzip-compressed (``.txt.gz``, ``.jsonl.gz``, ``.json.gz``);
- a directory: every such file below it, sorted by relative path (hidden files and other
  extensions are skipped).
Files are read with Hugging Face ``datasets`` (``streaming=True`` reads lazily). Empty documents
are skipped. Bad input raises ``ConfigError`` (a ValueError: exit 2 in the CLI) naming the file and what is allowed.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from trainer.data.cache import short_hash
from trainer.errors import ConfigError

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALLOWED = ("stdlib, or a local .txt/.jsonl/.json/.parquet file (.txt/.jsonl/.json may end in .gz) "
           "or a directory of them")
STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "tkinter",
               "turtledemo", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib's ``.py`` files making up the "stdlib" corpus, sorted by relative path."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def file_format(path: Path) -> Optional[str]:
    """The ``datasets`` builder for a data file ("text", "json", "parquet"), or None if unsupported."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
        if name.endswith(".parquet"):
            return None  # parquet compresses internally; a gzipped parquet is not readable
    return FORMATS.get(os.path.splitext(name)[1])


def corpus_files(source: str) -> list[Path]:
    """The files a non-stdlib source reads, in corpus order; ValueError if there are none."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        if file_format(path) is None:
            raise ConfigError(f"data.source={source!r}: unsupported file type {path.name!r}; allowed: {ALLOWED}")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"data.source={source!r}: no such file or directory; allowed: {ALLOWED}")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and file_format(Path(f)) is not None]
    if not found:
        raise ConfigError(f"data.source={source!r}: the directory holds no data files; allowed: {ALLOWED}")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def corpus_fingerprint(source: str, text_field: str = "text") -> str:
    """A short stable cache key for a corpus: file paths, sizes and mtimes (stdlib: Python version,
    relative paths and sizes, so every node with the same Python agrees)."""
    if source == "stdlib":
        root = stdlib_root()
        parts = [f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in stdlib_files()]
        return short_hash("stdlib", sys.version, *parts)
    base = Path(os.path.expanduser(source)).resolve()
    parts = []
    for p in corpus_files(source):
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return short_hash("files", base, text_field, *parts)


def iter_documents(source: str, text_field: str = "text", streaming: bool = False) -> Iterator[str]:
    """Yield the corpus's documents deterministically (same order on every call and every rank)."""
    count = 0
    if source == "stdlib":
        for p in stdlib_files():
            text = p.read_text(encoding="utf-8", errors="replace")
            if text:
                count += 1
                yield text
    else:
        for p in corpus_files(source):
            for text in _file_documents(p, text_field, streaming):
                count += 1
                yield text
    if count == 0:
        raise ConfigError(f"data.source={source!r}: the corpus has no non-empty documents "
                         f"(field {text_field!r} for json/parquet); allowed: {ALLOWED}")


def _file_documents(path: Path, text_field: str, streaming: bool) -> Iterator[str]:
    """Documents of one data file through ``datasets.load_dataset``; errors name the file."""
    fmt = file_format(path)
    if path.stat().st_size == 0:
        return  # datasets raises a bare StopIteration on an empty json file
    field = "text" if fmt == "text" else text_field
    kwargs = {"sample_by": "paragraph", "encoding_errors": "replace"} if fmt == "text" else {}
    import datasets  # heavy (~1 s); only file corpora need it

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=streaming, **kwargs)
        columns = ds.column_names
        if columns is not None and field not in columns:
            raise ConfigError(f"{path}: no field {field!r} (fields: {', '.join(columns)}); "
                             "set data.text_field to the field holding the text")
        rows = iter(ds.select_columns([field]) if columns is not None else ds)
        for i, row in enumerate(rows):
            if field not in row:
                raise ConfigError(f"{path}: row {i} has no field {field!r} (fields: {', '.join(row)}); "
                                 "set data.text_field to the field holding the text")
            text = row[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ConfigError(f"{path}: row {i} field {field!r} is {type(text).__name__}, not a string")
            if fmt == "text":
                text = text.strip("\n")
            if text:
                yield text
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: cannot read as {fmt}: {err}") from err
    except (datasets.exceptions.DatasetsError, StopIteration, OSError) as err:
        raise ConfigError(f"{path}: cannot read as {fmt}: {err!r}") from err
