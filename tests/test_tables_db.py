"""File-based tables (hash, btree, lmdb, cdb) against real Postfix 3.7 postmap.

Files made by the real postmap must read the same through our classes, and
files made by our build()/update()/delete() must read the same through the
real postmap (and pass db5.3_verify for Berkeley DB).
"""

from __future__ import annotations

import fcntl
import os
import time
import shutil
import struct
import subprocess
import sys

import pytest

from proxymap import dictflags as F
from proxymap.tables import cdb, filelock, nulkeys
from proxymap.tables.base import TableError, TableOpenError, Unsupported
from proxymap.tables.berkeleydb import BtreeTable, HashTable
from proxymap.tables.cdb import CdbTable
from proxymap.tables.lmdb import LmdbTable
from tests.instance import POSTMAP

DB_VERIFY = shutil.which("db5.3_verify")
DB_STAT = shutil.which("db5.3_stat")
HAVE_POSTMAP = POSTMAP is not None
needs_postmap = pytest.mark.skipif(not HAVE_POSTMAP, reason="real Postfix postmap not installed")

CLASSES = {"hash": HashTable, "btree": BtreeTable, "lmdb": LmdbTable, "cdb": CdbTable}
SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}
WRITABLE = ("hash", "btree", "lmdb")
SEQUENCED = ("hash", "btree", "lmdb")

SOURCE = (
    "Foo bar\n"
    "MiXeD Value With  Spaces\n"
    "ünï välue\n"
    "user@Example.COM 0:0:1:ok\n"
    "plain x\n"
).encode()
# key as looked up (before folding) -> expected value
EXPECTED = {
    b"foo": b"bar",
    b"FOO": b"bar",
    b"mixed": b"Value With  Spaces",
    "ünï".encode(): "välue".encode(),
    b"USER@example.com": b"0:0:1:ok",
    b"plain": b"x",
}
STORED = {b"foo": b"bar", b"mixed": b"Value With  Spaces", "ünï".encode(): "välue".encode(),
          b"user@example.com": b"0:0:1:ok", b"plain": b"x"}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("postfix")
    cf = base / "cf"
    cf.mkdir()
    (cf / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {base}/queue\n"
        f"data_directory = {base}/data\n"
        "mail_owner = postfix\n")
    return str(cf)


def postmap(config_dir, *args, stdin: bytes = b""):
    proc = subprocess.run([POSTMAP, "-c", config_dir, *args], input=stdin,
                          capture_output=True, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def real_query_many(config_dir, spec, keys, *opts):
    rc, out, err = postmap(config_dir, *opts, "-q", "-", spec, stdin=b"".join(k + b"\n" for k in keys))
    assert b"fatal" not in err, err
    return dict(line.split(b"\t", 1) for line in out.splitlines())


def real_list(config_dir, spec, *opts):
    rc, out, err = postmap(config_dir, *opts, "-s", spec)
    assert rc == 0 and not err, err
    return sorted(tuple(line.split(b"\t", 1)) for line in out.splitlines())


def stored_convention(cls, type_name, name) -> int:
    """TRY1NULL or TRY0NULL: how the file stores key `foo`."""
    table = cls(type_name, name, 0, False, {})
    try:
        assert table.lookup(b"foo") is not None
        return table.flags & nulkeys.NUL_BITS
    finally:
        table.close()


def db_stat(path) -> str:
    """db_stat's description of a file, without its first line: the local
    time at which db_stat ran, which differs between two runs a second apart."""
    out = subprocess.run([DB_STAT, "-d", path], check=True, capture_output=True, text=True,
                         timeout=30).stdout
    return "".join(line for line in out.splitlines(keepends=True)
                   if not line.rstrip("\n").endswith("\tLocal time"))


def table_file(tmp_path, type_name):
    return str(tmp_path / f"{type_name}map")


# --- pure helpers ----------------------------------------------------------

def test_open_flags_enable_both_conventions_only_when_none_given():
    assert nulkeys.open_flags(0) & nulkeys.NUL_BITS == nulkeys.NUL_BITS
    assert nulkeys.open_flags(F.TRY0NULL) & nulkeys.NUL_BITS == F.TRY0NULL
    assert nulkeys.open_flags(F.TRY1NULL | F.LOCK) == F.TRY1NULL | F.LOCK


def test_probes_try_nul_form_first_and_narrow_keeps_the_hit():
    both = F.TRY0NULL | F.TRY1NULL
    assert nulkeys.probes(both, b"k") == [(F.TRY1NULL, b"k\0"), (F.TRY0NULL, b"k")]
    assert nulkeys.probes(F.TRY0NULL, b"k") == [(F.TRY0NULL, b"k")]
    assert nulkeys.narrow(both | F.LOCK, F.TRY0NULL) == F.TRY0NULL | F.LOCK


def test_write_bit_defaults_when_undecided():
    both = F.TRY0NULL | F.TRY1NULL
    assert nulkeys.write_bit(both) == F.TRY1NULL
    assert nulkeys.write_bit(both, F.TRY0NULL) == F.TRY0NULL
    assert nulkeys.write_bit(F.TRY0NULL) == F.TRY0NULL
    assert nulkeys.write_bit(0, F.TRY0NULL) == F.TRY0NULL
    assert nulkeys.encode(F.TRY1NULL, b"v") == b"v\0"
    assert nulkeys.cut_value(b"ab\0cd\0") == b"ab"
    assert nulkeys.cut_value(b"abc") == b"abc"


def test_prepare_records_folds_and_handles_duplicates():
    entries = [(b"Foo", b"1"), (b"foo", b"2"), (b"Bar", b"3")]
    warnings = []
    got = nulkeys.prepare_records(entries, F.FOLD_FIX | F.DUP_WARN, F.TRY1NULL,
                                  warnings.append, "/x.db")
    assert got == {b"foo\0": b"1\0", b"bar\0": b"3\0"}
    assert warnings == ['/x.db: duplicate entry: "foo"']
    got = nulkeys.prepare_records(entries, F.FOLD_FIX | F.DUP_REPLACE | F.TRY0NULL, F.TRY1NULL,
                                  warnings.append, "/x.db")
    assert got == {b"foo": b"2", b"bar": b"3"}
    got = nulkeys.prepare_records(entries, F.FOLD_FIX | F.DUP_IGNORE | F.DUP_WARN, F.TRY1NULL,
                                  warnings.append, "/x.db")
    assert len(warnings) == 1 and got[b"foo\0"] == b"1\0"
    assert nulkeys.prepare_records(entries, 0, F.TRY0NULL, warnings.append, "x") == {
        b"Foo": b"1", b"foo": b"2", b"Bar": b"3"}
    with pytest.raises(TableError, match='duplicate entry: "foo"'):
        nulkeys.prepare_records(entries, F.FOLD_FIX, F.TRY0NULL, warnings.append, "x")


def test_param_int_falls_back_to_default():
    assert nulkeys.param_int({}, "lmdb_map_size", 7) == 7
    assert nulkeys.param_int({"lmdb_map_size": " 4096 "}, "lmdb_map_size", 7) == 4096
    assert nulkeys.param_int({"lmdb_map_size": "lots"}, "lmdb_map_size", 7) == 7


def test_cdb_hash_and_image_roundtrip():
    assert cdb.cdb_hash(b"") == 5381
    assert cdb.cdb_hash(b"a") == (5381 * 33) ^ ord("a")
    records = [(b"k%d" % i, b"v%d" % i) for i in range(600)] + [(b"", b"empty")]
    image = cdb.encode_cdb(records)
    assert len(image) == (cdb.HEADER_SIZE + sum(8 + len(k) + len(v) for k, v in records)
                          + 8 * 2 * len(records))
    for key, value in records:
        assert cdb.find(image, key) == value
    assert cdb.find(image, b"k600") is None
    empty = cdb.encode_cdb([])
    assert len(empty) == cdb.HEADER_SIZE and cdb.find(empty, b"x") is None
    # every header entry of an empty db points just past the header
    assert struct.unpack_from("<II", empty, 8 * 17) == (cdb.HEADER_SIZE, 0)


# --- locks -----------------------------------------------------------------

def test_flock_conflicts_between_descriptors(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    a, b = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        assert filelock.lock(a, filelock.FLOCK, filelock.SHARED, wait=False)
        assert filelock.lock(b, filelock.FLOCK, filelock.SHARED, wait=False)
        assert not filelock.lock(b, filelock.FLOCK, filelock.EXCLUSIVE, wait=False)
        filelock.lock(a, filelock.FLOCK, filelock.UNLOCK)
        assert filelock.lock(b, filelock.FLOCK, filelock.EXCLUSIVE, wait=False)
    finally:
        os.close(a)
        os.close(b)


def _probe_fcntl_from_child(path) -> str:
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n"
            "    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
            "    print('free')\n"
            "except OSError:\n"
            "    print('busy')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.strip()


def test_fcntl_lock_excludes_other_processes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDWR)
    try:
        assert filelock.lock(fd, filelock.FCNTL, filelock.EXCLUSIVE, wait=False)
        assert _probe_fcntl_from_child(path) == "busy"
        filelock.lock(fd, filelock.FCNTL, filelock.UNLOCK)
        assert _probe_fcntl_from_child(path) == "free"
    finally:
        os.close(fd)


def _record_locks(monkeypatch):
    """The (style, op) of every lock system call made from now on, as the
    kernel sees them (TableLock calls flock(2) directly where it can)."""
    calls = []
    ops = {fcntl.LOCK_SH: filelock.SHARED, fcntl.LOCK_EX: filelock.EXCLUSIVE,
           fcntl.LOCK_UN: filelock.UNLOCK}
    real_flock, real_lockf = fcntl.flock, fcntl.lockf

    def flock(fd, code):
        calls.append((filelock.FLOCK, ops[code & ~fcntl.LOCK_NB]))
        return real_flock(fd, code)

    def lockf(fd, code, *args):
        calls.append((filelock.FCNTL, ops[code & ~fcntl.LOCK_NB]))
        return real_lockf(fd, code, *args)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(fcntl, "lockf", lockf)
    return calls


@pytest.mark.parametrize("type_name", WRITABLE)
def test_lock_flag_locks_each_operation(tmp_path, monkeypatch, type_name):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    cls.build(type_name, name, [(b"a", b"1")], F.DUP_WARN, {}, print)
    table = cls(type_name, name, 0, True, {})
    style = filelock.FCNTL if type_name == "lmdb" else filelock.FLOCK
    calls = _record_locks(monkeypatch)
    try:
        table.lookup(b"a")
        assert calls == []
        table.flags |= F.LOCK | F.DUP_REPLACE
        table.lookup(b"a")
        assert calls == [(style, filelock.SHARED), (style, filelock.UNLOCK)]
        del calls[:]
        table.update(b"b", b"2")
        table.delete(b"b")
        assert calls == [(style, filelock.EXCLUSIVE), (style, filelock.UNLOCK)] * 2
        del calls[:]
        table.sequence(True)
        assert calls == [(style, filelock.SHARED), (style, filelock.UNLOCK)]
    finally:
        table.close()


@pytest.mark.parametrize("type_name", ["hash", "btree", "cdb"])
def test_open_lock_is_exclusive_for_the_instance_life(tmp_path, type_name):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    cls.build(type_name, name, [(b"a", b"1")], F.DUP_WARN, {}, print)
    first = cls(type_name, name, F.OPEN_LOCK, type_name != "cdb", {})
    try:
        with pytest.raises(TableOpenError, match="unable to get exclusive lock"):
            cls(type_name, name, F.OPEN_LOCK, False, {})
        # other lockers are kept out, even between operations
        fd = os.open(name + SUFFIX[type_name], os.O_RDONLY)
        try:
            assert not filelock.lock(fd, filelock.FLOCK, filelock.SHARED, wait=False)
        finally:
            os.close(fd)
        # requests with LOCK do not release the lifetime lock
        first.flags |= F.LOCK
        assert first.lookup(b"a") == b"1"
        with pytest.raises(TableOpenError):
            cls(type_name, name, F.OPEN_LOCK, False, {})
    finally:
        first.close()
    cls(type_name, name, F.OPEN_LOCK, False, {}).close()


def test_lmdb_open_lock_becomes_per_operation_locking(tmp_path, monkeypatch):
    name = table_file(tmp_path, "lmdb")
    LmdbTable.build("lmdb", name, [(b"a", b"1")], F.DUP_WARN, {}, print)
    one = LmdbTable("lmdb", name, F.OPEN_LOCK, True, {})
    two = LmdbTable("lmdb", name, F.OPEN_LOCK, True, {})  # no exclusive open lock
    calls = _record_locks(monkeypatch)
    try:
        assert one.flags & F.MULTI_WRITER
        assert one.lookup(b"a") == b"1"  # request without LOCK still locks
        assert calls == [(filelock.FCNTL, filelock.SHARED), (filelock.FCNTL, filelock.UNLOCK)]
    finally:
        one.close()
        two.close()


# --- real postmap files read by our classes --------------------------------

VARIANTS = {"": None, "-N": F.TRY1NULL, "-n": F.TRY0NULL}


@needs_postmap
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("type_name", list(CLASSES))
def test_reads_files_made_by_real_postmap(tmp_path, config_dir, type_name, variant):
    src = table_file(tmp_path, type_name)
    with open(src, "wb") as fh:
        fh.write(SOURCE)
    opts = [variant] if variant else []
    rc, _, err = postmap(config_dir, *opts, f"{type_name}:{src}")
    assert rc == 0, err
    expected_bit = VARIANTS[variant] or (F.TRY0NULL if type_name == "cdb" else F.TRY1NULL)
    table = CLASSES[type_name](type_name, src, F.FOLD_FIX | F.LOCK, False, {})
    try:
        assert table.flags & nulkeys.NUL_BITS == nulkeys.NUL_BITS
        for key, value in EXPECTED.items():
            assert table.lookup(key) == value, key
        assert table.flags & nulkeys.NUL_BITS == expected_bit
        assert table.lookup(b"missing") is None
        table.flags &= ~F.FOLD_FIX
        assert table.lookup(b"FOO") is None
        if type_name in SEQUENCED:
            seen = []
            record = table.sequence(True)
            while record is not None:
                seen.append(record)
                record = table.sequence(False)
            assert sorted(seen) == sorted(STORED.items())
            assert sorted(seen) == real_list(config_dir, f"{type_name}:{src}", *opts)
            assert table.sequence(False) is None
        else:
            with pytest.raises(Unsupported):
                table.sequence(True)
    finally:
        table.close()


@needs_postmap
@pytest.mark.parametrize("type_name", list(CLASSES))
def test_missing_file_reports_like_postmap(tmp_path, config_dir, type_name):
    name = str(tmp_path / "absent")
    with pytest.raises(TableOpenError) as info:
        CLASSES[type_name](type_name, name, 0, False, {})
    rc, _, err = postmap(config_dir, "-q", "x", f"{type_name}:{name}")
    assert rc == 1
    assert f"fatal: {info.value}".encode() in err


# --- files made by our build() read by real postmap ------------------------

BUILD_ENTRIES = [(b"Foo", b"bar"), (b"MiXeD", b"Value With  Spaces"),
                 ("ünï".encode(), "välue".encode()), (b"foo", b"second"),
                 (b"user@Example.COM", b"0:0:1:ok"), (b"plain", b"x")]


@needs_postmap
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("type_name", list(CLASSES))
def test_real_postmap_reads_our_build(tmp_path, config_dir, type_name, variant):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    spec = f"{type_name}:{name}"
    flags = F.FOLD_FIX | F.DUP_WARN | (VARIANTS[variant] or 0)
    warnings = []
    assert cls.build(type_name, name, BUILD_ENTRIES, flags, {}, warnings.append) == 5

    # the duplicate warning reads exactly like the real postmap's
    src = str(tmp_path / "source")
    with open(src, "wb") as fh:
        fh.write(b"".join(k + b" " + v + b"\n" for k, v in BUILD_ENTRIES))
    real_name = str(tmp_path / "real")
    shutil.copy(src, real_name)
    _, _, err = postmap(config_dir, f"{type_name}:{real_name}")
    assert warnings == [warnings[0]]
    assert f"warning: {warnings[0]}".replace(name, real_name).encode() in err

    opts = [variant] if variant else []
    expected_bit = VARIANTS[variant] or (F.TRY0NULL if type_name == "cdb" else F.TRY1NULL)
    assert stored_convention(cls, type_name, name) == expected_bit
    if type_name in ("hash", "btree") and DB_VERIFY:
        subprocess.run([DB_VERIFY, name + ".db"], check=True, capture_output=True, timeout=30)
    if type_name in ("hash", "btree") and DB_STAT and not variant:
        # same records, same libdb layout parameters (page size, buckets, fill)
        assert db_stat(name + ".db") == db_stat(real_name + ".db")
    # the real postmap probes both forms by default, and the forced one with -N/-n
    for real_opts in {(), tuple(opts)}:
        found = real_query_many(config_dir, spec, list(EXPECTED), *real_opts)
        assert found == EXPECTED
        rc, out, _ = postmap(config_dir, *real_opts, "-q", "FOO", spec)
        assert (rc, out) == (0, b"bar\n")
        rc, out, _ = postmap(config_dir, *real_opts, "-q", "nokey", spec)
        assert (rc, out) == (1, b"")
    if type_name in SEQUENCED:
        assert real_list(config_dir, spec, *opts) == sorted(STORED.items())


@needs_postmap
@pytest.mark.parametrize("type_name", WRITABLE)
def test_real_postmap_sees_our_updates_and_deletes(tmp_path, config_dir, type_name):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    spec = f"{type_name}:{name}"
    cls.build(type_name, name, BUILD_ENTRIES, F.FOLD_FIX | F.DUP_WARN, {}, lambda m: None)
    table = cls(type_name, name, 0, True, {})
    try:
        table.flags |= F.FOLD_FIX | F.DUP_REPLACE | F.SYNC_UPDATE | F.LOCK
        assert table.update(b"NewKey", b"new value")
        assert table.update(b"plain", b"replaced")
        assert table.delete(b"FOO")
        assert not table.delete(b"foo")
        assert not table.delete(b"never")
        assert not table.changed()  # our own writes are not a change
        expected = dict(STORED)
        del expected[b"foo"]
        expected.update({b"newkey": b"new value", b"plain": b"replaced"})
        assert real_list(config_dir, spec) == sorted(expected.items())
        if DB_VERIFY and type_name != "lmdb":
            subprocess.run([DB_VERIFY, name + ".db"], check=True, capture_output=True,
                           timeout=30)
        # real postmap -d and -i on the file we keep open; a fresh instance sees them
        rc, _, err = postmap(config_dir, "-d", "mixed", spec)
        assert rc == 0, err
        rc, _, err = postmap(config_dir, "-i", spec, stdin=b"Added by-real\n")
        assert rc == 0, err
        if type_name == "lmdb":  # other writers are no reason to reopen
            assert not table.changed()
        else:
            assert table.changed()
    finally:
        table.close()
    again = cls(type_name, name, F.FOLD_FIX, False, {})
    try:
        assert again.lookup(b"mixed") is None
        assert again.lookup(b"ADDED") == b"by-real"
        assert again.lookup(b"newkey") == b"new value"
    finally:
        again.close()


@pytest.mark.parametrize("type_name", WRITABLE)
def test_duplicate_update_is_refused_without_replace(tmp_path, monkeypatch, type_name):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    logged = []
    monkeypatch.setattr(nulkeys.maillog, "warning", logged.append)
    table = cls(type_name, name, 0, True, {})
    try:
        assert table.update(b"k", b"one")
        table.flags |= F.DUP_WARN
        assert table.update(b"k", b"two") is False
        assert table.lookup(b"k") == b"one"
        assert logged and 'duplicate entry: "k"' in logged[0]
        table.flags = (table.flags & ~F.DUP_WARN) | F.DUP_IGNORE
        assert table.update(b"k", b"three") is False
        assert len(logged) == 1
        table.flags |= F.DUP_REPLACE
        assert table.update(b"k", b"four")
        assert table.lookup(b"k") == b"four"
    finally:
        table.close()


@pytest.mark.parametrize("type_name", WRITABLE)
def test_writable_open_creates_file_respecting_umask(tmp_path, type_name):
    name = table_file(tmp_path, type_name)
    old = os.umask(0o077)
    try:
        table = CLASSES[type_name](type_name, name, 0, True, {})
    finally:
        os.umask(old)
    try:
        mode = os.stat(name + SUFFIX[type_name]).st_mode & 0o777
        assert mode == 0o600
        assert table.lookup(b"x") is None
        assert table.update(b"x", b"y")
        assert table.flags & nulkeys.NUL_BITS == F.TRY1NULL
    finally:
        table.close()


def test_read_only_instance_refuses_writes(tmp_path):
    name = table_file(tmp_path, "hash")
    HashTable.build("hash", name, [(b"a", b"1")], 0, {}, print)
    table = HashTable("hash", name, 0, False, {})
    try:
        with pytest.raises(TableError):
            table.update(b"b", b"2")
        with pytest.raises(TableError):
            table.delete(b"a")
    finally:
        table.close()


def test_cdb_refuses_writes_even_when_opened_writable(tmp_path):
    name = table_file(tmp_path, "cdb")
    CdbTable.build("cdb", name, [(b"a", b"1")], 0, {}, print)
    table = CdbTable("cdb", name, 0, True, {})
    try:
        with pytest.raises(Unsupported):
            table.update(b"b", b"2")
        with pytest.raises(Unsupported):
            table.delete(b"a")
        assert table.lookup(b"a") == b"1"
    finally:
        table.close()


@pytest.mark.parametrize("type_name", list(CLASSES))
def test_damaged_file_is_an_open_error(tmp_path, type_name):
    name = table_file(tmp_path, type_name)
    with open(name + SUFFIX[type_name], "wb") as fh:
        fh.write(b"this is not a database" * 10)
    with pytest.raises(TableOpenError, match="open database"):
        CLASSES[type_name](type_name, name, 0, False, {})


# --- rebuild ---------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["hash", "btree"])
def test_rebuild_truncates_in_place(tmp_path, type_name):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    cls.build(type_name, name, [(b"old%d" % i, b"v") for i in range(500)], 0, {}, print)
    inode = os.stat(name + ".db").st_ino
    reader = cls(type_name, name, 0, False, {})
    try:
        assert cls.build(type_name, name, [(b"new", b"v")], 0, {}, print) == 1
        assert os.stat(name + ".db").st_ino == inode
        assert reader.changed()
    finally:
        reader.close()
    table = cls(type_name, name, 0, False, {})
    try:
        assert table.lookup(b"old1") is None and table.lookup(b"new") == b"v"
    finally:
        table.close()
    # an empty leftover file is rebuilt too
    open(name + ".db", "wb").close()
    assert cls.build(type_name, name, [(b"k", b"v")], 0, {}, print) == 1
    if DB_VERIFY:
        subprocess.run([DB_VERIFY, name + ".db"], check=True, capture_output=True, timeout=30)


def test_rebuild_waits_for_no_one_but_holds_exclusive_lock(tmp_path, monkeypatch):
    name = table_file(tmp_path, "btree")
    calls = _record_locks(monkeypatch)
    BtreeTable.build("btree", name, [(b"k", b"v")], 0, {}, print)
    assert calls == [(filelock.FLOCK, filelock.EXCLUSIVE)]


def test_lmdb_rebuild_empties_and_grows_map(tmp_path):
    name = table_file(tmp_path, "lmdb")
    LmdbTable.build("lmdb", name, [(b"old", b"v")], 0, {}, print)
    inode = os.stat(name + ".lmdb").st_ino
    entries = [(b"key%05d" % i, b"v" * 200) for i in range(400)]
    assert LmdbTable.build("lmdb", name, entries, 0, {"lmdb_map_size": "32768"}, print) == 400
    assert os.stat(name + ".lmdb").st_ino == inode
    table = LmdbTable("lmdb", name, 0, True, {"lmdb_map_size": "32768"})
    try:
        assert table.lookup(b"old") is None
        assert table.lookup(b"key00399") == b"v" * 200
        for i in range(300):
            assert table.update(b"more%04d" % i, b"w" * 300)
        assert table.lookup(b"more0299") == b"w" * 300
    finally:
        table.close()


def test_cdb_build_replaces_file_atomically(tmp_path):
    name = table_file(tmp_path, "cdb")
    CdbTable.build("cdb", name, [(b"old", b"v")], 0, {}, print)
    reader = CdbTable("cdb", name, 0, False, {})
    try:
        CdbTable.build("cdb", name, [(b"new", b"v")], 0, {}, print)
        assert not os.path.exists(name + ".cdb.tmp")
        assert reader.lookup(b"old") == b"v"  # the old file stays readable
        assert reader.changed()
    finally:
        reader.close()
    fresh = CdbTable("cdb", name, 0, False, {})
    try:
        assert fresh.lookup(b"old") is None and fresh.lookup(b"new") == b"v"
    finally:
        fresh.close()


# --- sequence --------------------------------------------------------------

@pytest.mark.parametrize("type_name", SEQUENCED)
def test_sequence_survives_verify_cleanup_pattern(tmp_path, type_name):
    """first, next, ..., deleting the record returned before the current one
    and updating other keys in between, as verify(8)'s cache cleanup does."""
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    keys = [b"user%03d@example.com" % i for i in range(300)]
    cls.build(type_name, name, [(k, b"0:0:1:ok") for k in keys], 0, {}, print)
    table = cls(type_name, name, F.OPEN_LOCK, True, {})
    table.flags |= F.DUP_REPLACE | F.SYNC_UPDATE
    seen = []
    gone = set()
    previous = None
    try:
        record = table.sequence(True)
        while record is not None:
            key, value = record
            seen.append(key)
            if previous is not None and len(seen) % 2 == 0 and previous not in gone:
                assert table.delete(previous)  # delete-behind
                gone.add(previous)
            other = keys[-1 - len(seen) // 7]
            if len(seen) % 7 == 0 and other not in gone:
                assert table.update(other, b"0:0:2:ok")  # update of another key
            if len(seen) % 11 == 0:
                assert table.update(b"added%03d" % len(seen), b"0:0:3:ok")
            if len(seen) % 13 == 0:
                assert table.delete(key)  # the record just returned
                gone.add(key)
            previous = key
            record = table.sequence(False)
            assert len(seen) < 1000
        assert table.sequence(False) is None
        assert table.sequence(False) is None
    finally:
        table.close()
    original_seen = [k for k in seen if not k.startswith(b"added")]
    assert sorted(original_seen) == sorted(keys)  # every original record once
    if type_name != "hash":
        assert seen == sorted(seen)  # byte-wise order


@pytest.mark.parametrize("type_name", SEQUENCED)
def test_sequence_next_before_first_starts_at_the_beginning(tmp_path, type_name):
    cls = CLASSES[type_name]
    name = table_file(tmp_path, type_name)
    cls.build(type_name, name, [(b"b", b"2"), (b"a", b"1")], 0, {}, print)
    table = cls(type_name, name, 0, False, {})
    try:
        first = table.sequence(False)
        assert first == table.sequence(True)
        assert sorted([first, table.sequence(False)]) == [(b"a", b"1"), (b"b", b"2")]
        assert table.sequence(False) is None
        assert table.sequence(True) == first  # FIRST restarts after the end
    finally:
        table.close()


@pytest.mark.parametrize("type_name", SEQUENCED)
def test_sequence_of_empty_table(tmp_path, type_name):
    table = CLASSES[type_name](type_name, table_file(tmp_path, type_name), 0, True, {})
    try:
        assert table.sequence(True) is None
        assert table.sequence(False) is None
    finally:
        table.close()


def age_files(directory, seconds=10):
    """Make files look written a while ago: a stamp of a file written in the
    last few milliseconds is not trusted (see Table.remember_file)."""
    past = time.time() - seconds
    for entry in os.scandir(directory):
        os.utime(entry.path, (past, past))


@needs_postmap
@pytest.mark.parametrize("type_name", list(CLASSES))
def test_changed_after_external_rebuild(tmp_path, config_dir, type_name):
    src = table_file(tmp_path, type_name)
    with open(src, "wb") as fh:
        fh.write(b"a 1\n")
    assert postmap(config_dir, f"{type_name}:{src}")[0] == 0
    age_files(tmp_path)
    table = CLASSES[type_name](type_name, src, 0, False, {})
    try:
        assert not table.changed()
        with open(src, "wb") as fh:
            fh.write(b"a 1\nb 2\n")
        assert postmap(config_dir, f"{type_name}:{src}")[0] == 0
        # lmdb (MULTI_WRITER) only counts a replaced or removed file
        assert table.changed() == (type_name != "lmdb")
        if type_name == "lmdb":
            assert table.lookup(b"b") == b"2"  # it sees the rebuild anyway
            os.rename(src + ".lmdb", src + ".old")
            assert table.changed()
    finally:
        table.close()


def test_lmdb_reader_follows_a_writer_that_grew_the_map(tmp_path):
    name = table_file(tmp_path, "lmdb")
    small = {"lmdb_map_size": "32768"}
    LmdbTable.build("lmdb", name, [(b"a", b"1")], 0, small, print)
    reader = LmdbTable("lmdb", name, 0, False, small)
    try:
        assert reader.lookup(b"a") == b"1"
        writer = ("import sys\n"
                  "from proxymap.tables.lmdb import LmdbTable\n"
                  "w = LmdbTable('lmdb', sys.argv[1], 0, True, {'lmdb_map_size': '32768'})\n"
                  "for i in range(500):\n"
                  "    assert w.update(b'k%d' % i, b'v' * 500)\n"
                  "w.close()\n")
        subprocess.run([sys.executable, "-c", writer, name], check=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert os.path.getsize(name + ".lmdb") > 32768 * 4
        assert reader.lookup(b"k499") == b"v" * 500
        assert reader.sequence(True) == (b"a", b"1")
    finally:
        reader.close()


def test_failed_open_releases_the_lifetime_lock(tmp_path):
    """A table opened with OPEN_LOCK whose database then fails to open must
    give the lock back, or the process would think it still owns the file
    and skip per-request locks on it."""
    from proxymap.tables import filelock
    from proxymap.tables.berkeleydb import BtreeTable
    path = tmp_path / "broken"
    (tmp_path / "broken.db").write_bytes(b"not a database" * 400)
    with pytest.raises(TableOpenError):
        BtreeTable("btree", str(path), F.OPEN_LOCK, True, {})
    assert filelock._lifetime_locks == {}
    fd = os.open(tmp_path / "broken.db", os.O_RDONLY)
    try:
        assert filelock.lock(fd, filelock.FLOCK, filelock.EXCLUSIVE, wait=False)
    finally:
        os.close(fd)


def test_db_stat_comparison_ignores_the_clock(tmp_path, config_dir):
    """Two real builds of the same source, their files' stamps a day apart
    and db_stat run at different moments: the descriptions still compare
    equal (the suite once failed when two builds fell on different seconds)."""
    if not DB_STAT:
        pytest.skip("db_stat not installed")
    src = tmp_path / "src"
    src.write_bytes(b"a 1\nb 2\n")
    names = []
    for n in ("one", "two"):
        shutil.copy(src, tmp_path / n)
        postmap(config_dir, f"btree:{tmp_path / n}")
        names.append(str(tmp_path / n) + ".db")
    os.utime(names[0], (86400, 86400))
    first = db_stat(names[0])
    assert "Btree magic number" in first and "Local time" not in first
    assert first == db_stat(names[1])
