"""The trailing-NUL convention of Postfix's file-based tables.

Postfix may store a key and its value either with one trailing NUL byte
(TRY1NULL) or without (TRY0NULL). A table opened without either bit accepts
both: a lookup probes `key\\0` first, then `key`, and the first hit decides
the convention for the rest of the instance's life. A writer that is still
undecided picks the platform default (Linux: with NUL, except cdb which
postmap writes without). Values come back cut at the first NUL.

These helpers are pure functions on the flags word; the table classes
(hash, btree, lmdb, cdb) keep the narrowed flags in `self.flags`.
"""

from __future__ import annotations

from proxymap import dictflags as F

NUL_BITS = F.TRY0NULL | F.TRY1NULL


def open_flags(flags: int) -> int:
    """Flags for a table being opened for reading: with no TRY bit given,
    both conventions are enabled."""
    if not flags & NUL_BITS:
        flags |= NUL_BITS
    return flags


def probes(flags: int, key: bytes) -> list[tuple[int, bytes]]:
    """The stored forms to try for `key`, in order, each with the TRY bit
    that a hit on it confirms."""
    out = []
    if flags & F.TRY1NULL:
        out.append((F.TRY1NULL, key + b"\0"))
    if flags & F.TRY0NULL:
        out.append((F.TRY0NULL, key))
    return out


def narrow(flags: int, hit: int) -> int:
    """After a hit on the form `hit` (TRY0NULL or TRY1NULL), keep only that
    convention."""
    return (flags & ~NUL_BITS) | hit


def write_bit(flags: int, default: int = F.TRY1NULL) -> int:
    """The convention a write uses: the decided one, or `default` when the
    flags still allow both (or neither)."""
    bits = flags & NUL_BITS
    if bits == F.TRY1NULL or bits == F.TRY0NULL:
        return bits
    return default


def encode(bit: int, data: bytes) -> bytes:
    """Key or value in the stored form of convention `bit`."""
    return data + b"\0" if bit == F.TRY1NULL else data


def cut_value(stored: bytes) -> bytes:
    """A stored value as returned to callers: up to its first NUL."""
    end = stored.find(b"\0")
    return stored if end < 0 else stored[:end]


def decode_key(stored: bytes) -> bytes:
    """A stored key as returned by sequence: up to its first NUL."""
    return cut_value(stored)
