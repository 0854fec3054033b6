"""The verified reader: tensors read in place from mapped shard files equal what was saved, for
every layout of tensor a state may hold, and a file damaged on one rank stops every rank."""

import io

import torch
import torch.distributed as dist

import trainer.checkpoint.reader as reader_mod
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.checkpoint.reader import zip_records
from trainer.checkpoint.state import TensorDict as Tensors


def varied() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "matrix": torch.randn(64, 48, generator=g),
        "transposed": torch.randn(48, 64, generator=g).t(),  # strides (1, 64), minimal storage
        "bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "int64_scalar": torch.tensor(12345678901, dtype=torch.int64),
        "bool": torch.rand(17, generator=g) > 0.5,
        "empty": torch.zeros(0, 5),
        "float64": torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
    }


def test_tensors_are_read_in_place_and_equal_what_was_saved(tmp_path, monkeypatch):
    saved = varied()
    path = Checkpointer(tmp_path).save(1, {"t": Tensors({k: v.clone() for k, v in saved.items()})})

    def no_torch_load(*args, **kwargs):
        raise AssertionError("a plain tensor went through torch.load instead of the in-place read")

    monkeypatch.setattr(reader_mod.torch, "load", no_torch_load)
    target = {k: torch.zeros_like(v) for k, v in saved.items()}
    target["transposed"] = torch.zeros(64, 48)
    Checkpointer(tmp_path).load(path, {"t": Tensors(target)})
    for key, value in saved.items():
        assert target[key].dtype == value.dtype and torch.equal(target[key], value), key


def test_zip_records_finds_a_torch_save_archive_and_rejects_other_bytes():
    buf = io.BytesIO()
    torch.save(torch.arange(10, dtype=torch.int32), buf)
    records = zip_records(memoryview(buf.getvalue()))
    assert any(name.endswith("/data.pkl") for name in records)
    start, size = next(v for k, v in records.items() if k.endswith("/data/0"))
    assert size == 40 and buf.getvalue()[start:start + 4] == (0).to_bytes(4, "little")
    assert zip_records(memoryview(b"not a zip archive at all, just bytes")) is None
    assert zip_records(memoryview(buf.getvalue()[:-10])) is None  # truncated directory


def _damaged_on_one_rank(directory):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)
    ck = Checkpointer(directory)
    path = ck.save(1, {"t": Tensors({"w": distribute_tensor(full, mesh, [Shard(0)])})})
    if dist.get_rank() == 0:
        shard = path / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
        shard.write_bytes(bytes(data))
    dist.barrier()
    target = distribute_tensor(torch.zeros(64, 8), mesh, [Shard(0)])
    try:
        ck.load(path, {"t": Tensors({"w": target})})
    except CheckpointError as err:
        return str(err), bool(torch.all(target.to_local() == 0))
    return None, bool(torch.all(target.to_local() == 0))


def test_a_file_damaged_for_one_rank_stops_every_rank_before_any_load(tmp_path, run_ranks):
    (msg0, untouched0), (msg1, untouched1) = run_ranks(2, _damaged_on_one_rank, str(tmp_path))
    # both ranks refuse, naming the file (rank 0 never read it: it learns of it from rank 1)
    assert msg0 is not None and msg1 is not None
    assert "__1_0.distcp: checksum mismatch" in msg0 and "__1_0.distcp: checksum mismatch" in msg1
    assert untouched0 and untouched1


def test_archives_it_does_not_recognise_are_read_by_torch_load(tmp_path, monkeypatch):
    saved = varied()
    path = Checkpointer(tmp_path).save(1, {"t": Tensors({k: v.clone() for k, v in saved.items()})})
    monkeypatch.setattr(reader_mod, "zip_records", lambda buf: None)
    target = {k: torch.zeros_like(v) for k, v in saved.items()}
    Checkpointer(tmp_path).load(path, {"t": Tensors(target)})
    assert all(torch.equal(target[k], v) for k, v in saved.items())


def test_files_that_cannot_be_mapped_are_read_instead(tmp_path, monkeypatch):
    saved = varied()
    path = Checkpointer(tmp_path).save(1, {"t": Tensors({k: v.clone() for k, v in saved.items()})})

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on file systems without it

    monkeypatch.setattr(reader_mod.mmap, "mmap", no_mmap)
    target = {k: torch.zeros_like(v) for k, v in saved.items()}
    Checkpointer(tmp_path).load(path, {"t": Tensors(target)})
    assert all(torch.equal(target[k], v) for k, v in saved.items())
