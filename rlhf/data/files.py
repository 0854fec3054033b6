"""Rows of a local .jsonl / .json / .parquet file through Hugging Face `datasets` (offline)."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(path: str, fields: dict[str, str], key: str) -> list[dict]:
    """Every row of `path` with `fields` (name in the row -> option naming it) present and strings."""
    p = Path(path)
    if p.suffix not in FORMATS:
        raise ConfigError(f"{key}={path!r}: a local file ending in {', '.join(FORMATS)} (or the built-in 'arithmetic')")
    if not p.is_file():
        raise ConfigError(f"{key}={path!r}: no such file")
    import datasets

    datasets.disable_progress_bars()
    data = datasets.load_dataset(FORMATS[p.suffix], data_files=str(p), split="train")
    for name, option in fields.items():
        if name not in data.column_names:
            raise ConfigError(f"{option}={name!r}: {path} has no such field; its fields: {', '.join(data.column_names)}")
    rows = [{name: row[name] for name in fields} for row in data]
    if not rows:
        raise ConfigError(f"{key}={path!r} has no rows")
    return rows
