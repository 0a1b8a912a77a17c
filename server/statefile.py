"""The on-disk state file: a tiny, versioned, checksummed format that a crash
at any instant leaves readable.

The file is 64 bytes: two 32-byte slots, written alternately. Each slot is

    magic  b"CNTR"                      4 bytes
    format version (1), big-endian      2 bytes
    reserved, zero                      2 bytes
    sequence number, big-endian u64     8 bytes   (higher = newer)
    counter value, big-endian u64       8 bytes
    XXH64 (seed 0) of the 24 bytes above, big-endian u64

A commit overwrites the older slot (sequence n goes to slot n % 2) and syncs,
holding an exclusive flock so that writers in several processes take turns.
If the machine dies mid-write, that slot fails its checksum and the other one
still holds the previous commit, so loading takes the newest valid slot. A
new file is written whole to a temporary name, synced, renamed into place and
its directory synced, so it never exists half-written.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

MAGIC = b"CNTR"
VERSION = 1
SLOT_SIZE = 32
FILE_SIZE = 2 * SLOT_SIZE
_BODY = struct.Struct(">4sHHQQ")
_CHECKSUM = struct.Struct(">Q")


class StateFileError(Exception):
    """The state file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Slot:
    sequence: int
    value: int


def encode_slot(sequence: int, value: int) -> bytes:
    """One 32-byte slot."""
    body = _BODY.pack(MAGIC, VERSION, 0, sequence, value)
    return body + _CHECKSUM.pack(xxhash.xxh64_intdigest(body))


def decode_slot(raw: bytes) -> Slot | str:
    """The slot in ``raw``, or why it is not usable (a short phrase)."""
    if len(raw) != SLOT_SIZE:
        return f"slot is {len(raw)} bytes, expected {SLOT_SIZE}"
    body, (checksum,) = raw[:24], _CHECKSUM.unpack(raw[24:])
    magic, version, _, sequence, value = _BODY.unpack(body)
    if magic != MAGIC:
        return "not a counter state file (bad magic)"
    if xxhash.xxh64_intdigest(body) != checksum:
        return "checksum mismatch"
    if version != VERSION:
        return f"unknown format version {version}"
    return Slot(sequence, value)


def decode_file(path: str, raw: bytes) -> Slot:
    """The newest valid slot of a whole file; StateFileError if there is none."""
    if len(raw) != FILE_SIZE:
        raise StateFileError(
            f"state file {path}: wrong size ({len(raw)} bytes, expected {FILE_SIZE})"
        )
    slots = [decode_slot(raw[:SLOT_SIZE]), decode_slot(raw[SLOT_SIZE:])]
    valid = [s for s in slots if isinstance(s, Slot)]
    if not valid:
        problems = "; ".join(dict.fromkeys(str(s) for s in slots))
        raise StateFileError(f"state file {path}: corrupt, no valid slot ({problems})")
    return max(valid, key=lambda s: s.sequence)


class StateFile:
    """An open state file: ``load_or_create`` (or ``open``), then ``commit``.

    Commits from several processes may share one file: each takes an
    exclusive ``flock`` for the whole write-and-sync, so only one slot is ever
    being written, and numbers its commit after the newest one on disk.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def open(self) -> None:
        """Open a file that ``load_or_create`` (maybe in another process) made."""
        self._fd = os.open(self.path, os.O_RDWR)

    def commit(self, read_value: Callable[[], int], sync: bool) -> int:
        """Write the value ``read_value()`` returns, read under the lock so that
        later commits never carry a smaller value, and sync it if ``sync``;
        returns the value written. Blocking: run it in a worker thread."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            newest = decode_file(self.path, os.pread(self._fd, FILE_SIZE + 1, 0))
            value = read_value()
            sequence = newest.sequence + 1
            os.pwrite(self._fd, encode_slot(sequence, value), (sequence % 2) * SLOT_SIZE)
            if sync:
                os.fdatasync(self._fd)
            return value
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def load_or_create(self) -> tuple[Slot, bool]:
        """Open the file, creating it (value 0) if missing. Returns the newest
        slot and whether the file existed. StateFileError if unusable."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            self._create()
            fd = os.open(self.path, os.O_RDWR)
            existed = False
        except OSError as exc:
            raise StateFileError(f"state file {self.path}: {exc.strerror.lower()}") from None
        else:
            existed = True
        try:
            raw = os.pread(fd, FILE_SIZE + 1, 0)
            slot = decode_file(self.path, raw)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return slot, existed

    def _create(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        temporary = f"{self.path}.new"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, encode_slot(0, 0) + encode_slot(1, 0))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, self.path)
            sync_directory(directory)
        except OSError as exc:
            raise StateFileError(
                f"state file {self.path}: cannot create it: {exc.strerror.lower()}"
            ) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sync_directory(directory: str) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
