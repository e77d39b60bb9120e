"""A batch's files: its requests, as the client sent them, and one result per item.

Under the batch directory (``[batches] directory``), each batch has a directory of its own:

- ``requests.jsonl``: one ``{"custom_id", "params"}`` object per line, in the client's order;
- ``index``: where each item's line starts, how long it is and its ``custom_id`` (``INDEX``
  records), so that a runner reads one item without reading the rest, and the results of
  items never run are written without reading the requests;
- ``results/NNN/<item>``: the item's result line, written once.

Results are files rather than store entries because a batch's can reach hundreds of megabytes
and are kept for 29 days: Redis would hold them in memory, and the SQLite store is the file
every request's admission writes to. With several hosts the directory is shared storage (NFS
or the like), which all of them read and write.

A result is written to a file of its own and then linked to its name, which fails if the name
exists: of two runs of one item (a runner presumed dead that was not), exactly one result is
kept, whichever linked first, and a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import Iterator
from typing import BinaryIO

from app.config import Settings

INDEX = struct.Struct("<QI64s")  # offset, length, custom_id (at most 64 ASCII characters)
SHARD = 1000  # results per subdirectory


def batch_directory(settings: Settings) -> str:
    return settings.batches.directory or os.path.join(settings.state.directory, "batches")


class BatchFiles:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, batch_id: str) -> str:
        return os.path.join(self.directory, batch_id)

    @contextlib.contextmanager
    def writing(self, batch_id: str) -> Iterator[RequestsWriter]:
        """A new batch's requests, written under a temporary name and moved into place, synced,
        only when the block ends without an error (nothing is left of a refused one)."""
        os.makedirs(self.directory, exist_ok=True)
        temporary = os.path.join(self.directory, f".new-{batch_id}")
        os.makedirs(temporary)
        try:
            with (
                open(os.path.join(temporary, "requests.jsonl"), "wb") as lines,
                open(os.path.join(temporary, "index"), "wb") as index,
            ):
                writer = RequestsWriter(lines, index)
                yield writer
                for handle in (lines, index):
                    handle.flush()
                    os.fsync(handle.fileno())
            os.makedirs(os.path.join(temporary, "results"))
            os.rename(temporary, self.path(batch_id))
            _sync_directory(self.directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def request(self, batch_id: str, index: int) -> bytes:
        """The item's line: ``{"custom_id", "params"}``."""
        base = self.path(batch_id)
        with open(os.path.join(base, "index"), "rb") as handle:
            handle.seek(index * INDEX.size)
            offset, length, _ = INDEX.unpack(handle.read(INDEX.size))
        with open(os.path.join(base, "requests.jsonl"), "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def custom_ids(self, batch_id: str, start: int, stop: int) -> list[str]:
        """The ids of items ``start`` to ``stop - 1``, read from the index alone."""
        with open(os.path.join(self.path(batch_id), "index"), "rb") as handle:
            handle.seek(start * INDEX.size)
            data = handle.read((stop - start) * INDEX.size)
        return [
            custom_id.rstrip(b"\0").decode("ascii") for _, _, custom_id in INDEX.iter_unpack(data)
        ]

    def write_result(self, batch_id: str, index: int, line: bytes, token: str) -> bool:
        """Keep the item's result line; False if it has one already (that one stays)."""
        shard = self._shard(batch_id, index)
        os.makedirs(shard, exist_ok=True)
        temporary = os.path.join(shard, f".{index}.{token}")
        with open(temporary, "wb") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, os.path.join(shard, str(index)))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)

    def result(self, batch_id: str, index: int) -> bytes | None:
        try:
            with open(os.path.join(self._shard(batch_id, index), str(index)), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def remove(self, batch_id: str) -> None:
        shutil.rmtree(self.path(batch_id), ignore_errors=True)

    def _shard(self, batch_id: str, index: int) -> str:
        return os.path.join(self.path(batch_id), "results", f"{index // SHARD:03d}")


class RequestsWriter:
    """Appends items to a new batch's requests file and its index."""

    def __init__(self, lines: BinaryIO, index: BinaryIO) -> None:
        self.lines = lines
        self.index = index
        self.offset = 0
        self.count = 0

    def add(self, custom_id: str, line: bytes) -> None:
        self.lines.write(line)
        self.lines.write(b"\n")
        self.index.write(INDEX.pack(self.offset, len(line), custom_id.encode("ascii")))
        self.offset += len(line) + 1
        self.count += 1


def _sync_directory(path: str) -> None:
    """The rename made durable: a crash right after ``create`` answered keeps the batch."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
