"""Atomic writes: the target holds the old content or the whole new one, and racing writers never
share a temporary file."""

import os
import threading

import pytest

from trainer.atomic import atomic_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "latest"
    write_text_atomic(target, "step_1\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "w").write("step_2 half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "step_1\n" and os.listdir(tmp_path) == ["latest"]
    write_text_atomic(target, "step_2\n")
    assert target.read_text() == "step_2\n" and os.listdir(tmp_path) == ["latest"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_racing_writers_each_leave_a_whole_file(tmp_path):
    target = tmp_path / "d" / "pointer"
    texts = [f"writer {i}\n" * 1000 for i in range(8)]
    threads = [threading.Thread(target=write_text_atomic, args=(target, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in texts and os.listdir(tmp_path / "d") == ["pointer"]
