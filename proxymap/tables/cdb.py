"""`cdb:` tables: D. J. Bernstein's constant database, as Postfix 3.7 uses it.

`cdb:/p/name` reads `/p/name.cdb`. The table is lookup-only (Postfix 3.7
supports neither update, delete nor sequence on it); postmap builds it into
`name.cdb.tmp` and renames that over `name.cdb`, keys and values written
without a trailing NUL; lookups still probe `key\\0` before `key`. Postfix
3.11 lists it (sequence, in file order): so do we, for 3.11 requests.

The file format is small and public, so it is read and written here
directly rather than through a binding (tinycdb, which Debian's Postfix
uses, writes the same layout):

* 256 pairs (table offset, slot count) of little-endian u32 — 2048 bytes;
* the records, each `klen u32, dlen u32, key, data`;
* 256 hash tables of (hash u32, record offset u32) slots, twice as many
  slots as keys, open addressing from slot `(hash >> 8) % slots`, table
  number `hash & 255`, hash = djb's `h = (h * 33) ^ byte` from 5381;
  an offset of 0 marks an empty slot.
"""

from __future__ import annotations

import mmap
import os
import struct

from proxymap import dictflags as F
from proxymap.tables import filelock, nulkeys
from proxymap.tables.base import Table, TableError, TableOpenError, snapshot_walk
from proxymap.tables.filelock import TableLock

HEADER_SIZE = 2048
_PAIR = struct.Struct("<II")
_MAX_OFFSET = 0xFFFFFFFF


def cdb_hash(data: bytes) -> int:
    """The cdb hash function."""
    h = 5381
    for byte in data:
        h = ((h << 5) + h) & 0xFFFFFFFF ^ byte
    return h


def find(buf, key: bytes) -> bytes | None:
    """The data of the first record with `key` in cdb image `buf`, or None.
    Raises ValueError on a damaged image."""
    h = cdb_hash(key)
    table_pos, slots = _PAIR.unpack_from(buf, (h & 255) * 8)
    if slots == 0:
        return None
    start = (h >> 8) % slots
    for i in range(slots):
        slot_hash, record = _PAIR.unpack_from(buf, table_pos + ((start + i) % slots) * 8)
        if record == 0:
            return None
        if slot_hash != h:
            continue
        klen, dlen = _PAIR.unpack_from(buf, record)
        begin = record + 8
        if buf[begin:begin + klen] == key:
            if begin + klen + dlen > len(buf):
                raise ValueError("record runs past the end of the file")
            return bytes(buf[begin + klen:begin + klen + dlen])
    return None


def stored_keys(buf) -> list[bytes]:
    """The keys of every record in cdb image `buf`, in file order (the
    order Postfix 3.11's cdb sequence lists them). Raises ValueError on a
    damaged image."""
    end = min(_PAIR.unpack_from(buf, i * 8)[0] for i in range(256))
    if end > len(buf) or end < HEADER_SIZE:
        raise ValueError("hash tables outside the file")
    keys = []
    pos = HEADER_SIZE
    while pos < end:
        klen, dlen = _PAIR.unpack_from(buf, pos)
        if pos + 8 + klen + dlen > end:
            raise ValueError("record runs past the end of the records")
        keys.append(bytes(buf[pos + 8:pos + 8 + klen]))
        pos += 8 + klen + dlen
    return keys


def encode_cdb(records) -> bytes:
    """The complete cdb image holding `records` ((key, data) pairs, written
    in the order given). Raises ValueError when it would exceed 4 GiB."""
    body = bytearray()
    tables: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    for key, data in records:
        pos = HEADER_SIZE + len(body)
        body += _PAIR.pack(len(key), len(data)) + key + data
        h = cdb_hash(key)
        tables[h & 255].append((h, pos))
    header = bytearray()
    table_area = bytearray()
    table_pos = HEADER_SIZE + len(body)
    for entries in tables:
        slots = 2 * len(entries)
        header += _PAIR.pack(table_pos + len(table_area), slots)
        cells = [(0, 0)] * slots
        for h, pos in entries:
            i = (h >> 8) % slots
            while cells[i][1] != 0:
                i = (i + 1) % slots
            cells[i] = (h, pos)
        for cell in cells:
            table_area += _PAIR.pack(*cell)
    if table_pos + len(table_area) > _MAX_OFFSET:
        raise ValueError("cdb file would exceed 4 GiB")
    return bytes(header + body + table_area)


class CdbTable(nulkeys.NulKeyTable):
    """Read-only `cdb:` table; the whole file is mapped into memory."""

    answers_cacheable = True

    impl_flags = F.FIXED

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        path = name + ".cdb"
        self.label = name
        self._map = None
        self.lock = TableLock.open_file(path, False, filelock.FLOCK, self.spec, self.flags,
                                        False)
        try:
            fd = self.lock.fd
            if os.fstat(fd).st_size < HEADER_SIZE:
                raise TableOpenError(f"open database {path}: not a cdb file (too short)")
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except BaseException as exc:
            self.lock.close()
            self.lock = None
            if isinstance(exc, OSError):
                raise TableOpenError(f"open database {path}: {exc.strerror or exc}") from None
            raise
        self.remember_file(path)

    def _get(self, stored_key):
        try:
            return find(self._map, stored_key)
        except (ValueError, struct.error) as exc:
            raise TableError(f"read database {self.path}: corrupted cdb file ({exc})") from None

    # A constant database: writes are not supported, and Postfix lists it
    # only since 3.11 (3.7's cdb client aborts on sequence).
    update = Table.update
    delete = Table.delete
    sequence_since_311 = True

    def walk(self, position):
        def keys():
            try:
                return stored_keys(self._map)
            except (ValueError, struct.error) as exc:
                raise TableError(f"read database {self.path}: corrupted cdb file ({exc})") \
                    from None

        record = snapshot_walk(position, keys, self._get)
        if record is None:
            return None
        position, key, value = record
        return position, nulkeys.decode_key(key), nulkeys.cut_value(value)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @classmethod
    def build(cls, type_name, name, entries, flags, params, warn) -> int:
        """Write `name.cdb.tmp` under an exclusive flock and rename it over
        `name.cdb`; keys and values without NUL unless TRY1NULL alone is
        given (postmap -N). Returns the number of records stored."""
        path = name + ".cdb"
        tmp = path + ".tmp"
        fd = filelock.open_for_rebuild(tmp, filelock.FLOCK)
        try:
            records = nulkeys.prepare_records(entries, flags, F.TRY0NULL, warn, name)
            try:
                image = encode_cdb(records.items())
            except ValueError as exc:
                raise TableError(f"write database {tmp}: {exc}") from None
            try:
                os.ftruncate(fd, 0)
                view = memoryview(image)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                os.rename(tmp, path)
            except OSError as exc:
                _unlink_quietly(tmp)
                raise TableError(f"write database {tmp}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return len(records)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
