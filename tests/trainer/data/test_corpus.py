"""Corpus sources: stdlib, txt, jsonl, json, parquet, directories; fingerprints; clear errors."""

import gzip
import itertools
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.corpus import corpus_fingerprint, iter_documents, stdlib_files, stdlib_root


def test_stdlib_corpus_is_nonempty_sorted_and_deterministic():
    files = stdlib_files()
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert len(files) > 100 and rel == sorted(rel)
    assert not any(part in ("test", "tests", "site-packages", "idlelib") for r in rel for part in r.split("/"))
    first = list(itertools.islice(iter_documents("stdlib"), 5))
    assert first == list(itertools.islice(iter_documents("stdlib"), 5))
    assert first[0] == files[0].read_text(encoding="utf-8", errors="replace")
    assert corpus_fingerprint("stdlib") == corpus_fingerprint("stdlib")


def test_jsonl_streaming_and_not_agree_and_skip_empty(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "one"}, {"text": ""}, {"text": None}, {"text": "two\n"}, {"text": "three"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(iter_documents(str(path))) == ["one", "two\n", "three"]
    assert list(iter_documents(str(path), streaming=True)) == ["one", "two\n", "three"]


def test_json_array_parquet_and_custom_field(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": "x1"}, {"body": "x2"}]))
    assert list(iter_documents(str(tmp_path / "a.json"), text_field="body")) == ["x1", "x2"]
    pq.write_table(pa.table({"content": ["p0", "p1", "p2"], "n": [0, 1, 2]}), tmp_path / "b.parquet")
    for streaming in (False, True):
        assert list(iter_documents(str(tmp_path / "b.parquet"), "content", streaming)) == ["p0", "p1", "p2"]


def test_txt_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n\nsecond ü\n\n\n\nthird\n")
    assert list(iter_documents(str(path), streaming=True)) == ["first para\nline two", "second ü", "third"]


def test_directory_reads_data_files_sorted_and_gz(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    with gzip.open(tmp_path / "sub" / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from sub/c"}) + "\n")
    assert list(iter_documents(str(tmp_path))) == ["from a", "from b", "from sub/c"]


def test_fingerprint_changes_with_content(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    before = corpus_fingerprint(str(path))
    assert before == corpus_fingerprint(str(path)) and len(before) == 16
    path.write_text(json.dumps({"text": "xy"}) + "\n")
    assert corpus_fingerprint(str(path)) != before
    assert corpus_fingerprint(str(path), "body") != corpus_fingerprint(str(path))


def test_bad_inputs_name_the_file_and_what_is_allowed(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"a\.jsonl: no field 'text' \(fields: body"):
            list(iter_documents(str(jsonl), streaming=streaming))
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"unsupported file type 'a\.csv'; allowed: stdlib, or a local \.txt"):
        list(iter_documents(str(tmp_path / "a.csv")))
    with pytest.raises(ValueError, match="no such file or directory"):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no non-empty documents"):
        list(iter_documents(str(tmp_path / "empty.jsonl")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: cannot read as json"):
        list(iter_documents(str(tmp_path / "bad.jsonl"), streaming=True))
    (tmp_path / "num.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match=r"num\.jsonl: row 0 field 'text' is int"):
        list(iter_documents(str(tmp_path / "num.jsonl")))
    os.mkdir(tmp_path / "nodata")
    with pytest.raises(ValueError, match="holds no data files"):
        list(iter_documents(str(tmp_path / "nodata")))
