"""The answer cache (proxymap/answercache.py), the inotify watcher
(proxymap/filewatch.py) and how the dispatcher uses both: bounds, TTLs,
counters, notifications for in-place writes and rename replacement, and
that a cached answer never outlives a change of its table."""

from __future__ import annotations

import os

import pytest

from proxymap import dictflags as F
from proxymap.answercache import MISS, AnswerCache, CacheStats
from proxymap.dispatch import Dispatcher
from proxymap.filewatch import FileWatcher, filesystem_type, inotify_sees_all_writes
from proxymap.protocol import RETRY, encode

# -- the cache alone -----------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_hit_miss_and_counters():
    cache = AnswerCache(10, 1000)
    assert cache.get(b"k") is MISS
    cache.put(b"k", b"v")
    assert cache.get(b"k") == b"v"
    assert cache.get(b"other", None) is None
    assert cache.stats.as_dict() == {"hits": 1, "misses": 2, "invalidations": 0,
                                     "evictions": 0}


def test_entry_bound_evicts_the_oldest():
    cache = AnswerCache(3, 1000)
    for key in (b"a", b"b", b"c", b"d"):
        cache.put(key, b"1")
    assert len(cache) == 3
    assert cache.get(b"a") is MISS and cache.get(b"d") == b"1"
    assert cache.stats.evictions == 1


def test_byte_bound_counts_keys_and_values():
    cache = AnswerCache(100, 10)
    cache.put(b"ab", b"cde")          # 5 bytes
    cache.put(b"fg", b"hij")          # 10 in all
    assert cache.bytes == 10 and len(cache) == 2
    cache.put(b"k", b"l")             # 2 more: the oldest goes
    assert cache.get(b"ab") is MISS and cache.bytes == 7
    cache.put(b"x", b"y" * 20)        # larger than the bound: not kept
    assert cache.get(b"x") is MISS and cache.bytes == 7


def test_replacing_a_key_keeps_the_byte_count_right():
    cache = AnswerCache(100, 100)
    cache.put((7, b"key"), b"value")
    cache.put((7, b"key"), b"v")
    assert cache.bytes == 8 + 3 + 1 and len(cache) == 1


def test_invalidate_forgets_everything_and_counts():
    stats = CacheStats()
    first, second = AnswerCache(10, 100, stats=stats), AnswerCache(10, 100, stats=stats)
    first.put(b"k", b"v")
    second.put(b"k", b"w")
    first.invalidate()
    assert first.get(b"k") is MISS and second.get(b"k") == b"w"
    assert (len(first), first.bytes) == (0, 0)
    assert stats.invalidations == 1 and stats.hits == 1


def test_discard_one_key():
    cache = AnswerCache(10, 100)
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    cache.discard(b"a")
    cache.discard(b"absent")
    assert cache.get(b"a") is MISS and cache.get(b"b") == b"2" and cache.bytes == 2


def test_ttl_and_negative_ttl():
    clock = Clock()
    cache = AnswerCache(10, 100, ttl=5, negative_ttl=1, clock=clock)
    cache.put(b"pos", b"v")
    cache.put(b"neg", None, negative=True)
    assert cache.get(b"neg", "miss") is None     # a cached negative answer
    clock.now += 1
    assert cache.get(b"neg", "miss") == "miss"
    assert cache.get(b"pos") == b"v"
    clock.now += 4
    assert cache.get(b"pos") is MISS
    assert (len(cache), cache.bytes) == (0, 0)


def test_negative_ttl_zero_keeps_no_negative_answers():
    cache = AnswerCache(10, 100, ttl=60, negative_ttl=0, clock=Clock())
    cache.put(b"neg", None, negative=True)
    assert cache.get(b"neg") is MISS and len(cache) == 0


def test_negative_answers_live_as_long_as_positive_ones_by_default():
    clock = Clock()
    cache = AnswerCache(10, 100, ttl=2, clock=clock)
    cache.put(b"neg", None, negative=True)
    clock.now += 1
    assert cache.get(b"neg", "miss") is None
    clock.now += 1
    assert cache.get(b"neg", "miss") == "miss"


def test_a_cache_needs_room():
    with pytest.raises(ValueError):
        AnswerCache(0, 100)


# -- which files inotify can watch ---------------------------------------------

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /srv/nfs nfs4 rw 0 0
tmpfs /srv/nfs/local tmpfs rw 0 0
sshfs#u@h: /mnt/s\\040space fuse.sshfs rw 0 0
"""


@pytest.mark.parametrize("path, fstype", [
    ("/etc/postfix/virtual.db", "ext4"),
    ("/srv/nfs/maps/virtual.db", "nfs4"),
    ("/srv/nfs", "nfs4"),
    ("/srv/nfsx/map", "ext4"),             # a name that only starts like the mount point
    ("/srv/nfs/local/map", "tmpfs"),       # the longest mount point wins
    ("/mnt/s space/map", "fuse.sshfs"),    # escaped blanks in /proc/self/mounts
])
def test_filesystem_type(path, fstype):
    assert filesystem_type(path, MOUNTS) == fstype


@pytest.mark.parametrize("fstype, local", [
    ("ext4", True), ("xfs", True), ("tmpfs", True), ("btrfs", True),
    ("nfs", False), ("nfs4", False), ("cifs", False), ("fuse.sshfs", False), ("9p", False),
])
def test_remote_filesystems_are_not_trusted_to_notify(fstype, local):
    assert inotify_sees_all_writes(fstype) is local


def test_a_table_on_nfs_gets_no_watch(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/x {tmp_path} nfs rw 0 0\n")
    (tmp_path / "map").write_text("k v\n")
    watcher = FileWatcher(mounts=str(mounts))
    try:
        assert watcher.watch(str(tmp_path / "map")) is None
    finally:
        watcher.close()


# -- notifications ------------------------------------------------------------


@pytest.fixture
def watcher():
    w = FileWatcher()
    yield w
    w.close()


def test_in_place_write_bumps_the_generation(tmp_path, watcher):
    path = tmp_path / "map"
    path.write_bytes(b"old")
    watch, new = watcher.watch(str(path))
    assert new and watch.gen == 0
    watcher.drain()
    assert watch.gen == 0
    with open(path, "r+b") as f:
        f.write(b"new")
    assert watch.gen == 0          # nothing counted before a drain
    watcher.drain()
    assert watch.gen > 0
    again, new = watcher.watch(str(path))
    assert again is watch and not new


def test_drain_reads_once_when_the_queue_fits(tmp_path, watcher, monkeypatch):
    path = tmp_path / "map"
    path.write_bytes(b"old")
    watch, _ = watcher.watch(str(path))
    with open(path, "r+b") as f:
        f.write(b"new")
    reads = []
    real_read = os.read
    monkeypatch.setattr("proxymap.filewatch.os.read",
                        lambda fd, n: reads.append(n) or real_read(fd, n))
    assert watcher.drain() > 0 and watch.gen > 0
    assert len(reads) == 1          # not a second one to learn that the queue is empty


def test_drain_counts_more_events_than_one_read_holds(tmp_path, watcher):
    from proxymap.filewatch import READ_SIZE
    path = tmp_path / "map"
    path.write_bytes(b"old")
    watch, _ = watcher.watch(str(path))
    # alternating kinds, so the kernel does not merge them: 16 bytes each
    events = 2 * (READ_SIZE // 16)
    with open(path, "r+b") as f:
        for n in range(events // 2):
            f.write(b"x")
            f.flush()
            os.chmod(path, 0o600 if n % 2 else 0o644)
    drained = watcher.drain()       # and the close's own event
    assert drained >= events and watch.gen == drained
    assert watcher.drain() == 0


def test_rename_replacement_is_seen_and_the_new_file_watched(tmp_path, watcher):
    path = tmp_path / "map"
    path.write_bytes(b"one")
    watch, _ = watcher.watch(str(path))
    (tmp_path / "map.tmp").write_bytes(b"two")
    os.rename(tmp_path / "map.tmp", path)
    watcher.drain()
    after_rename = watch.gen
    assert after_rename > 0
    with open(path, "r+b") as f:      # the new file is watched too
        f.write(b"TWO")
    watcher.drain()
    assert watch.gen > after_rename


def test_removed_and_created_again(tmp_path, watcher):
    path = tmp_path / "map"
    path.write_bytes(b"one")
    watch, _ = watcher.watch(str(path))
    path.unlink()
    watcher.drain()
    gone = watch.gen
    assert gone > 0
    path.write_bytes(b"two")
    watcher.drain()
    created = watch.gen
    assert created > gone
    with open(path, "r+b") as f:
        f.write(b"TWO")
    watcher.drain()
    assert watch.gen > created


def test_other_files_in_the_directory_do_not_count(tmp_path, watcher):
    path = tmp_path / "map"
    path.write_bytes(b"one")
    watch, _ = watcher.watch(str(path))
    (tmp_path / "unrelated").write_bytes(b"x")
    os.rename(tmp_path / "unrelated", tmp_path / "unrelated2")
    watcher.drain()
    assert watch.gen == 0


def test_a_missing_file_is_watched_once_created(tmp_path, watcher):
    path = tmp_path / "later"
    watch, new = watcher.watch(str(path))
    assert new and watch.file_wd is None
    path.write_bytes(b"x")
    watcher.drain()
    assert watch.gen > 0 and watch.file_wd is not None


# -- the dispatcher with both ---------------------------------------------------

def lookup(dispatcher, table, key, flags=F.LOCK | F.FOLD_FIX):
    attrs = [(k.encode(), v if isinstance(v, bytes) else str(v).encode()) for k, v in
             [("request", "lookup"), ("table", table), ("flags", flags), ("key", key)]]
    dispatcher.refresh()
    reply = dispatcher.handle(attrs)
    return dict(_decode(reply))


def _decode(reply: bytes):
    fields = reply.split(b"\0")
    pairs, i = [], 0
    while i + 1 < len(fields) and fields[i]:
        pairs.append((fields[i], fields[i + 1]))
        i += 2
    return pairs


def settle(path):
    """Date the file's last change 10 s back: an instance opened on a file
    changed in the last few milliseconds is reopened once (its stamp is not
    trusted, see Dispatcher._attach_watch), which these tests do not want
    to depend on."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def update(dispatcher, table, key, value):
    attrs = [(b"request", b"update"), (b"table", table.encode()),
             (b"flags", str(F.LOCK | F.FOLD_FIX).encode()), (b"key", key.encode()),
             (b"value", value.encode())]
    dispatcher.refresh()
    return dict(_decode(dispatcher.handle(attrs)))


def hash_table(tmp_path):
    from proxymap.tables.berkeleydb import HashTable
    name = str(tmp_path / "map")
    HashTable.build("hash", name, [(b"k", b"old")], F.TRY1NULL, {}, print)
    settle(name + ".db")
    return f"hash:{name}"


def make_dispatcher(tables, service="proxymap", **kwargs):
    kwargs.setdefault("cache_entries", 100)
    kwargs.setdefault("cache_bytes", 10000)
    return Dispatcher(service, set(tables), {}, watcher=FileWatcher(), **kwargs)


def test_reply_codec_helper_matches_the_wire():
    assert _decode(encode([(b"status", b"0"), (b"value", b"v")])) == \
        [(b"status", b"0"), (b"value", b"v")]


def test_hot_key_is_answered_from_the_cache_until_the_file_changes(tmp_path):
    src = tmp_path / "map"
    src.write_text("k v1\n")
    settle(src)
    table = f"texthash:{src}"
    d = make_dispatcher([table])
    try:
        assert lookup(d, table, "k")[b"value"] == b"v1"
        assert lookup(d, table, "k")[b"value"] == b"v1"
        assert lookup(d, table, "absent")[b"status"] == b"1"
        assert lookup(d, table, "absent")[b"status"] == b"1"
        assert (d.cache_stats.hits, d.cache_stats.misses) == (2, 2)
        src.write_text("k v2\n")
        assert lookup(d, table, "k")[b"value"] == b"v2"
        assert d.cache_stats.invalidations == 1
    finally:
        d.close_all()


def test_no_stat_per_request_while_watched(tmp_path, monkeypatch):
    src = tmp_path / "map"
    src.write_text("k v1\n")
    settle(src)
    table = f"texthash:{src}"
    d = make_dispatcher([table], cache_entries=0)
    try:
        assert lookup(d, table, "k")[b"value"] == b"v1"
        calls = []
        monkeypatch.setattr("proxymap.tables.base.file_stamp", lambda p: calls.append(p))
        assert lookup(d, table, "k")[b"value"] == b"v1"
        assert lookup(d, table, "k")[b"value"] == b"v1"
        assert calls == []
    finally:
        d.close_all()


def test_excluded_table_and_zero_entries_mean_no_cache(tmp_path):
    src = tmp_path / "map"
    src.write_text("k v\n")
    settle(src)
    table = f"texthash:{src}"
    for kwargs in ({"cache_exclude": {table}}, {"cache_entries": 0}):
        d = make_dispatcher([table], **kwargs)
        try:
            lookup(d, table, "k")
            lookup(d, table, "k")
            assert d.cache_stats.as_dict()["hits"] == d.cache_stats.misses == 0
        finally:
            d.close_all()


def test_flags_are_part_of_the_cache_key(tmp_path):
    src = tmp_path / "map"
    src.write_text("Key folded\n")
    settle(src)
    table = f"texthash:{src}"
    d = make_dispatcher([table])
    try:
        assert lookup(d, table, "KEY", flags=F.LOCK)[b"status"] == b"1"
        assert lookup(d, table, "KEY", flags=F.LOCK | F.FOLD_FIX)[b"status"] == b"1"
        # texthash folds its keys at load under FOLD_FIX of the open: as Postfix
        src.write_text("key folded\n")
        assert lookup(d, table, "KEY", flags=F.LOCK | F.FOLD_FIX)[b"value"] == b"folded"
        assert lookup(d, table, "KEY", flags=F.LOCK)[b"status"] == b"1"
    finally:
        d.close_all()


def test_own_write_invalidates_and_other_instances_see_it(tmp_path):
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        assert lookup(d, table, "k")[b"value"] == b"old"
        # an OPEN_LOCK instance of the same file is another instance
        assert lookup(d, table, "k", flags=F.LOCK | F.FOLD_FIX | F.OPEN_LOCK)[b"value"] == b"old"
        assert update(d, table, "k", "new")[b"status"] == b"0"
        assert lookup(d, table, "k")[b"value"] == b"new"
        assert lookup(d, table, "k", flags=F.LOCK | F.FOLD_FIX | F.OPEN_LOCK)[b"value"] == b"new"
    finally:
        d.close_all()


def test_writer_instance_is_not_reopened_for_its_own_writes(tmp_path):
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        lookup(d, table, "k")
        (instance,) = d.tables.values()
        for n in range(3):
            assert update(d, table, "k", f"v{n}")[b"status"] == b"0"
            assert lookup(d, table, "k")[b"value"] == f"v{n}".encode()
        assert list(d.tables.values()) == [instance]
    finally:
        d.close_all()


def delete(dispatcher, table, key):
    attrs = [(b"request", b"delete"), (b"table", table.encode()),
             (b"flags", str(F.LOCK | F.FOLD_FIX).encode()), (b"key", key.encode())]
    dispatcher.refresh()
    return dict(_decode(dispatcher.handle(attrs)))


@pytest.mark.parametrize("kind", ["hash", "lmdb"])
def test_watched_writer_neither_stats_nor_touches_its_file(tmp_path, monkeypatch, kind):
    """With an inotify watch, an update or delete takes no stamp of the
    file and leaves its mtime alone (on kernels with multigrain file times
    a stat() after each write makes every later write slower to sync)."""
    table = hash_table(tmp_path) if kind == "hash" else lmdb_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        lookup(d, table, "k")
        (instance,) = d.tables.values()
        assert instance.watch is not None
        stamps, touched = [], []
        monkeypatch.setattr("proxymap.tables.base.file_stamp", lambda p: stamps.append(p))
        monkeypatch.setattr("proxymap.tables.nulkeys.os.utime",
                            lambda *a, **k: touched.append(a))
        for n in range(3):
            assert update(d, table, f"n{n}", f"v{n}")[b"status"] == b"0"
            assert lookup(d, table, f"n{n}")[b"value"] == f"v{n}".encode()
            assert delete(d, table, f"n{n}")[b"status"] == b"0"
            assert lookup(d, table, f"n{n}")[b"status"] == b"1"
        assert stamps == [] and touched == []
        assert list(d.tables.values()) == [instance]     # not reopened either
    finally:
        d.close_all()


def test_watched_writer_still_sees_a_foreign_write_after_its_own(tmp_path):
    """Our own writes' notifications are counted in; another program's
    write after them is still a change (the instance re-reads the file and
    its cache forgets)."""
    from proxymap.tables.berkeleydb import HashTable
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        assert update(d, table, "ours", "1")[b"status"] == b"0"
        assert lookup(d, table, "k")[b"value"] == b"old"
        other = HashTable("hash", str(tmp_path / "map"), F.LOCK, True, {})
        try:
            other.flags |= F.LOCK | F.SYNC_UPDATE | F.DUP_REPLACE
            assert other.update(b"k", b"theirs")
        finally:
            other.close()
        assert lookup(d, table, "k")[b"value"] == b"theirs"
        assert update(d, table, "ours2", "2")[b"status"] == b"0"
        assert lookup(d, table, "ours")[b"value"] == b"1"
        assert lookup(d, table, "ours2")[b"value"] == b"2"
        assert lookup(d, table, "k")[b"value"] == b"theirs"
    finally:
        d.close_all()


# -- the write lane (proxywrite) -------------------------------------------------

def delete(dispatcher, table, key, refresh=True, **kwargs):
    attrs = [(b"request", b"delete"), (b"table", table.encode()),
             (b"flags", str(F.LOCK | F.FOLD_FIX).encode()), (b"key", key.encode())]
    if refresh:
        dispatcher.refresh()
    reply = dispatcher.handle(attrs, **kwargs)
    return reply if reply is None else dict(_decode(reply))


def _count_parses(monkeypatch):
    from proxymap import dispatch
    calls = []
    real = dispatch.parse_request

    def spy(attrs):
        calls.append(attrs[0][1])
        return real(attrs)

    monkeypatch.setattr(dispatch, "parse_request", spy)
    return calls


def test_write_lane_gives_the_full_paths_answers_and_counts(tmp_path, monkeypatch):
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    parses = _count_parses(monkeypatch)
    try:
        assert update(d, table, "K1", "v1")[b"status"] == b"0"
        assert delete(d, table, "absent")[b"status"] == b"1"
        assert parses == [b"update", b"delete"]     # the whole path, once each
        assert update(d, table, "K1", "v2")[b"status"] == b"0"
        assert update(d, table, "k2", "w")[b"status"] == b"0"
        assert delete(d, table, "K2")[b"status"] == b"0"
        assert delete(d, table, "k2")[b"status"] == b"1"
        assert parses == [b"update", b"delete"]     # the lane: no decoding
        assert lookup(d, table, "k1")[b"value"] == b"v2"    # FOLD_FIX, as the whole path
        assert lookup(d, table, "k2")[b"status"] == b"1"
        counters = d.metrics.table(table)
        assert sum(counters.requests) == 8
        assert sum(counters.latency) == 8
    finally:
        d.close_all()


def test_write_lane_keeps_a_foreign_write_seen_late(tmp_path):
    """Another program writes the file after our last drain: the lane's
    change re-reads the file under the exclusive lock (the table's own
    refresh), so that write is not lost; notified before, the lane leaves
    the request to the whole path, which reopens the instance."""
    from proxymap.tables.berkeleydb import HashTable
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")

    def foreign(key):
        other = HashTable("hash", str(tmp_path / "map"), F.LOCK, True, {})
        try:
            other.flags |= F.LOCK | F.SYNC_UPDATE | F.DUP_REPLACE
            assert other.update(key, b"theirs")
        finally:
            other.close()

    try:
        assert update(d, table, "ours1", "1")[b"status"] == b"0"
        foreign(b"late")            # not drained before the next change
        assert delete(d, table, "ours1", refresh=False)[b"status"] == b"0"
        foreign(b"early")           # drained: the whole path
        assert update(d, table, "ours2", "2")[b"status"] == b"0"
        for key, value in (("late", b"theirs"), ("early", b"theirs"), ("ours2", b"2")):
            assert lookup(d, table, key)[b"value"] == value
        assert lookup(d, table, "ours1")[b"status"] == b"1"
        assert d._hot_writes        # led to the reopened instance again
    finally:
        d.close_all()
    check = HashTable("hash", str(tmp_path / "map"), 0, False, {})
    try:
        assert [check.lookup(k) for k in (b"late", b"early", b"ours2", b"ours1")] == \
            [b"theirs", b"theirs", b"2", None]
    finally:
        check.close()


def test_write_lane_waits_for_a_busy_lock_like_the_whole_path(tmp_path, monkeypatch):
    import fcntl
    from proxymap.tables import filelock
    monkeypatch.setattr(filelock, "wait_limit", 0)      # as in the worker's loop
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        assert delete(d, table, "k")[b"status"] == b"0"
        fd = os.open(str(tmp_path / "map.db"), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert delete(d, table, "x", may_wait=True) is None     # asked again later
            assert delete(d, table, "x")[b"status"] == str(RETRY).encode()
        finally:
            os.close(fd)
        assert update(d, table, "k", "back")[b"status"] == b"0"
        assert lookup(d, table, "k")[b"value"] == b"back"
    finally:
        d.close_all()


# -- group commit (proxywrite) ---------------------------------------------------

def lmdb_table(tmp_path):
    from proxymap.tables.lmdb import LmdbTable
    name = str(tmp_path / "map")
    LmdbTable.build("lmdb", name, [(b"k", b"old")], F.TRY1NULL, {}, print)
    settle(name + ".lmdb")
    return f"lmdb:{name}"


def change(dispatcher, request, table, key, value=None):
    attrs = [(b"request", request.encode()), (b"table", table.encode()),
             (b"flags", str(F.LOCK | F.FOLD_FIX).encode()), (b"key", key.encode())]
    if value is not None:
        attrs.append((b"value", value.encode()))
    return dispatcher.handle(attrs)


def status_of(reply):
    return dict(_decode(reply))[b"status"]


def test_changes_of_one_pass_share_one_sync_and_are_answered_after_it(tmp_path, monkeypatch):
    from proxymap.tables.lmdb import LmdbTable
    table = lmdb_table(tmp_path)
    syncs = []
    real_commit = LmdbTable._commit
    monkeypatch.setattr(LmdbTable, "_commit", lambda self: (syncs.append(1), real_commit(self)))
    d = make_dispatcher([table], service="proxywrite")
    try:
        d.begin_batch()
        first = change(d, "update", table, "a", "1")
        second = change(d, "update", table, "b", "2")
        third = change(d, "delete", table, "absent")
        assert type(first) is not bytes and first.reply is None and second.reply is None
        assert syncs == []                       # nothing answered before the sync
        ended = d.end_batch()
        assert ended == [first, second, third] and syncs == [1]
        assert [status_of(r.reply) for r in ended] == [b"0", b"0", b"1"]
        assert lookup(d, table, "a")[b"value"] == b"1"
        assert (d.groups_committed, d.grouped_changes) == (1, 3)
        # without a batch every change is synced on its own, answered at once
        assert status_of(change(d, "update", table, "c", "3")) == b"0"
        assert syncs == [1, 1]
    finally:
        d.close_all()


def test_a_failed_sync_fails_every_change_of_the_group(tmp_path, monkeypatch):
    from proxymap.tables.base import TableError
    from proxymap.tables.lmdb import LmdbTable
    table = lmdb_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        d.begin_batch()
        first = change(d, "update", table, "a", "1")
        second = change(d, "delete", table, "k")

        def broken(self):
            raise TableError("sync database: Input/output error")
        monkeypatch.setattr(LmdbTable, "_commit", broken)
        ended = d.end_batch()
        assert [status_of(r.reply) for r in ended] == [b"%d" % RETRY] * 2
        monkeypatch.undo()
        # RETRY says "not known to be done"; the table goes on working
        d.begin_batch()
        again = change(d, "update", table, "a", "2")
        assert [status_of(r.reply) for r in d.end_batch()] == [b"0"] and again.reply
        assert lookup(d, table, "a")[b"value"] == b"2"
    finally:
        d.close_all()


def test_a_lookup_in_the_pass_closes_the_group_first(tmp_path):
    table = lmdb_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        d.begin_batch()
        pending = change(d, "update", table, "k", "new")
        assert pending.reply is None
        assert lookup(d, table, "k")[b"value"] == b"new"
        assert pending.reply is not None and status_of(pending.reply) == b"0"
        assert d.end_batch() == [pending]
    finally:
        d.close_all()


def test_berkeley_db_changes_are_synced_one_by_one_even_in_a_batch(tmp_path):
    table = hash_table(tmp_path)
    d = make_dispatcher([table], service="proxywrite")
    try:
        d.begin_batch()
        assert status_of(change(d, "update", table, "a", "1")) == b"0"   # answered at once
        assert d.end_batch() == [] and d.groups_committed == 0
    finally:
        d.close_all()


# -- the hot path of 3.6-3.10 lookups ----------------------------------------------

def test_hot_path_gives_the_full_paths_answers_and_follows_changes(tmp_path):
    src = tmp_path / "map"
    src.write_text("k v1\nother o\n")
    settle(src)
    table = f"texthash:{src}"
    d = make_dispatcher([table])
    try:
        first = lookup(d, table, "k", flags=64)            # full path, cached
        hits = d.cache_stats.hits
        assert lookup(d, table, "k", flags=64) == first     # hot path
        assert d.cache_stats.hits == hits + 1
        assert lookup(d, table, "other", flags=64)[b"value"] == b"o"
        assert lookup(d, table, "absent", flags=64)[b"status"] == b"1"
        assert lookup(d, table, "absent", flags=64)[b"status"] == b"1"
        src.write_text("k v2\n")
        assert lookup(d, table, "k", flags=64)[b"value"] == b"v2"
        assert lookup(d, table, "other", flags=64)[b"status"] == b"1"
        # another spelling of the same flags is its own hot entry, same answer
        assert lookup(d, table, "k", flags=b"0064")[b"value"] == b"v2"
    finally:
        d.close_all()


def test_hot_path_spellings_are_bounded(tmp_path):
    from proxymap import dispatch
    src = tmp_path / "map"
    src.write_text("k v\n")
    settle(src)
    table = f"texthash:{src}"
    d = make_dispatcher([table])
    try:
        for n in range(dispatch.HOT_SPELLINGS + 10):
            assert lookup(d, table, "k", flags=b"0" * (n % 5) + b"%d" % (64 + 256 * n))[b"value"] == b"v"
        assert len(d._hot) <= dispatch.HOT_SPELLINGS
    finally:
        d.close_all()
