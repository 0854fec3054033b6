"""Reading a checkpoint's DCP shard files once, verified, without staging copies.

DCP's own `FileSystemReader` reads every tensor with `torch.load` of its byte range (one copy into
a fresh tensor) and then copies it into the destination; Plait also checksummed each file in a
separate pass before that. `VerifiedReader` maps each file this rank needs, checks its xxh3
checksum over the mapping, agrees with the other ranks that every file is sound, and only then
copies each tensor straight from the page cache into its destination. A damaged file therefore
still changes nothing, and a load touches each byte twice (hash, copy) instead of four times.

Each tensor item in a `.distcp` file is a `torch.save` archive (an uncompressed zip). Its pickle
gives dtype, shape and strides; the raw bytes are a zip record, read in place. Anything this
module does not recognise (zip64, compression, stream transforms, a non-tensor) is read by
`torch.load` exactly as DCP does.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import xxhash
from torch import _weights_only_unpickler
from torch.distributed._shard._utils import narrow_tensor_by_index  # what DCP itself uses
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

# The mapped files are read-only and only ever copied from.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

EOCD = b"PK\x05\x06"  # end of central directory
CENTRAL = 0x02014B50
LOCAL = 0x04034B50


class ShardError(RuntimeError):
    """Shard files failed verification: `problems` names each (empty when another rank found them)."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()):
        super().__init__(message)
        self.problems = problems


def buffer_checksum(data) -> str:
    """xxh3-64 of a buffer, in the manifest's notation: catches truncation and bit rot at several
    GB/s, so verifying every load costs little next to reading the data."""
    return f"xxh3:{xxhash.xxh3_64_hexdigest(data)}"


def map_file(path: Path) -> memoryview:
    """A read-only mapping of a file's bytes (empty files give an empty view; a file system that
    cannot map files gets the bytes read into memory instead)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return memoryview(b"")
        try:
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))
        except (OSError, ValueError):
            return memoryview(f.read())


def file_checksum(path: Path) -> str:
    return buffer_checksum(map_file(path))


def zip_records(buf: memoryview) -> Optional[dict[str, tuple[int, int]]]:
    """name → (offset, size) of every stored (uncompressed) record of a zip archive held in `buf`;
    None for anything else (zip64, compression, a comment, a damaged directory)."""
    n = len(buf)
    if n < 22 or bytes(buf[n - 22:n - 18]) != EOCD:
        return None
    entries, _, cd_offset = struct.unpack_from("<HII", buf, n - 12)
    if cd_offset == 0xFFFFFFFF or entries == 0xFFFF:
        return None
    out, pos = {}, cd_offset
    for _ in range(entries):
        if pos + 46 > n or struct.unpack_from("<I", buf, pos)[0] != CENTRAL:
            return None
        method, = struct.unpack_from("<H", buf, pos + 10)
        size, = struct.unpack_from("<I", buf, pos + 20)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", buf, pos + 28)
        local, = struct.unpack_from("<I", buf, pos + 42)
        name = bytes(buf[pos + 46:pos + 46 + name_len]).decode("utf-8", "replace")
        pos += 46 + name_len + extra_len + comment_len
        if method != 0 or size == 0xFFFFFFFF or local + 30 > n or struct.unpack_from("<I", buf, local)[0] != LOCAL:
            return None
        local_name, local_extra = struct.unpack_from("<HH", buf, local + 26)
        start = local + 30 + local_name + local_extra
        if start + size > n:
            return None
        out[name] = (start, size)
    return out


class _Layout(NamedTuple):
    """What a `torch.save`d tensor's pickle says: storage record key, dtype, offset, size, stride."""

    key: str
    dtype: torch.dtype
    offset: int
    size: tuple
    stride: tuple


def _unpickle_layout(pickle_bytes: bytes) -> Optional[_Layout]:
    """The tensor layout a `data.pkl` describes, through the weights-only unpickler (storages are
    stand-ins on the meta device: no data is read)."""
    seen: dict = {}

    def persistent_load(saved_id):
        _, storage_type, key, _, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        seen["key"], seen["dtype"] = str(key), dtype
        untyped = torch.UntypedStorage(numel * torch._utils._element_size(dtype), device="meta")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickle_bytes), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    obj = unpickler.load()
    if type(obj) is not torch.Tensor or "key" not in seen:
        return None
    return _Layout(seen["key"], seen["dtype"], obj.storage_offset(), tuple(obj.shape), tuple(obj.stride()))


class VerifiedReader(FileSystemReader):
    """A `FileSystemReader` that verifies each file it reads against `checksums` (file name →
    "xxh3:…") before any destination tensor changes, on every rank of `group` alike, and then
    copies tensors out of the mapped files."""

    def __init__(self, path: str | Path, checksums: Optional[dict[str, str]] = None,
                 group: Optional[dist.ProcessGroup] = None, threads: int = 2):
        super().__init__(str(path))
        self.checksums = checksums
        self.group = group
        self.threads = threads  # files hashed and read in parallel (copies and xxhash drop the GIL)
        self._layouts: dict[bytes, Optional[_Layout]] = {}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        with ThreadPoolExecutor(max(1, min(self.threads, len(per_file)))) as pool:
            maps, problems = self._map_and_verify(per_file, pool)
            self._agree(problems)
            if any(self.storage_data[r.storage_index].transform_descriptors for reqs in per_file.values() for r in reqs):
                return super().read_data(plan, planner)  # stream transforms: DCP's own path

            def read_file(name: str) -> None:
                for req in per_file[name]:
                    self._read_item(maps[name], req, planner)

            list(pool.map(read_file, per_file))
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _map_and_verify(self, per_file: dict, pool: ThreadPoolExecutor) -> tuple[dict[str, memoryview], list[str]]:
        """Map each file and hash the mappings in parallel (xxhash releases the GIL)."""
        maps, problems = {}, []
        for name in per_file:
            path = Path(self.path) / name
            try:
                maps[name] = map_file(path)
            except OSError as err:
                problems.append(f"{path}: cannot be read ({err.strerror or err})")
                continue
            if self.checksums is not None and name not in self.checksums:
                problems.append(f"{path}: not listed in the manifest")
        if self.checksums is not None:
            names = [n for n in maps if n in self.checksums]
            for name, digest in zip(names, pool.map(lambda n: buffer_checksum(maps[n]), names)):
                if digest != self.checksums[name]:
                    problems.append(f"{Path(self.path) / name}: checksum mismatch (corrupted)")
        return maps, problems

    def _agree(self, problems: list[str]) -> None:
        """Raise on every rank if any rank found a bad file, so none of them loads anything."""
        bad = torch.tensor([int(bool(problems))])
        if dist.is_initialized() and self.use_collectives:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        if problems:
            raise ShardError("refusing to load a damaged checkpoint:\n  " + "\n  ".join(problems), tuple(problems))
        if bad.item():
            raise ShardError("refusing to load: another rank found a damaged checkpoint file (see its error)")

    def _read_item(self, buf: memoryview, req: ReadItem, planner: LoadPlanner) -> None:
        info = self.storage_data[req.storage_index]
        data = buf[info.offset:info.offset + info.length]
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(bytes(data)))
            return
        tensor = self._tensor_view(data)
        if tensor is None:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise ShardError(f"{info.relative_path}: item {req.storage_index.fqn} has size {tuple(tensor.size())}, "
                             f"expected {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)

    def _tensor_view(self, data: memoryview) -> Optional[torch.Tensor]:
        """The tensor a `torch.save` archive holds, as a view of `data` (no copy); None if the
        archive is not the plain single-tensor kind."""
        records = zip_records(data)
        if records is None:
            return None
        pkl = next((v for k, v in records.items() if k.endswith("/data.pkl")), None)
        if pkl is None:
            return None
        pickle_bytes = bytes(data[pkl[0]:pkl[0] + pkl[1]])
        if pickle_bytes not in self._layouts:
            try:
                self._layouts[pickle_bytes] = _unpickle_layout(pickle_bytes)
            except Exception:  # anything unusual: let torch.load handle (or report) it
                self._layouts[pickle_bytes] = None
        layout = self._layouts[pickle_bytes]
        record = layout and next((v for k, v in records.items() if k.endswith(f"/data/{layout.key}")), None)
        if record is None:
            return None
        start, nbytes = record
        itemsize = torch._utils._element_size(layout.dtype)
        if nbytes % itemsize:
            return None
        empty = 0 in layout.size
        needed = 0 if empty else layout.offset + sum((s - 1) * st for s, st in zip(layout.size, layout.stride)) + 1
        if needed * itemsize > nbytes:
            return None
        flat = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=start) if nbytes else torch.empty(0, dtype=torch.uint8)
        return flat.view(layout.dtype).as_strided(layout.size, layout.stride, layout.offset)
