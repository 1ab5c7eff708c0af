"""Durability of updates through proxywrite.

Postfix clients count an update as stored once proxywrite answers OK: the
server syncs after every change (SYNC_UPDATE, spec 9.6), so a crash of the
worker or of the master must not lose it, and the file must stay one that
real `postmap` and `db5.3_verify` accept. A real `postmap` writing the same
file with its flock while proxywrite updates must neither be corrupted nor
lose anything, which needs our table to re-read the file when another
writer changed it (spec 7.6: libdb keeps a private page cache).

Every test prints its figures (updates attempted / acknowledged / verified,
kills) so a run shows how much was actually exercised.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from proxymap import dictflags as F
from tests import durability_tools as D
from tests.worker_fixture import WorkerInstance

SEED = int(os.environ.get("DURABILITY_SEED", "20240611"))


def report(title: str, ledger: D.Ledger, figures: dict, kills: int | None = None) -> None:
    extra = "" if kills is None else f", kills {kills}"
    print(f"\nFIGURES {title}: attempted {ledger.attempted}, acknowledged {ledger.acked}, "
          f"sends that failed and were repeated {ledger.unknown}{extra}; keys {figures['keys']} "
          f"(verified definite {figures['definite']}, present {figures['present']}, "
          f"records in file {figures['records']})")


# -- pure helpers ------------------------------------------------------------------------

def test_possible_states_last_acknowledged_wins():
    assert D.possible_states([("a", True), ("b", True)]) == {"b"}
    assert D.possible_states([("a", True), (D.ABSENT, True)]) == {D.ABSENT}


def test_possible_states_lost_answer_allows_both():
    assert D.possible_states([("a", True), ("b", None)]) == {"a", "b"}
    assert D.possible_states([("a", None)]) == {D.ABSENT, "a"}
    # a resend that is answered settles it
    assert D.possible_states([("a", True), ("b", None), ("b", True)]) == {"b"}


def test_mismatches_reports_lost_and_stale_keys():
    states = {"k1": {"v1"}, "k2": {D.ABSENT}, "k3": {"x", "y"}}
    assert D.mismatches(states, {"k1": "v1", "k3": "y"}) == []
    bad = D.mismatches(states, {"k2": "zombie", "k3": "y"})
    assert len(bad) == 2 and bad[0].startswith("k1:") and bad[1].startswith("k2:")


def test_parse_listing():
    assert D.parse_listing("a\tb c\nk\t\n") == {"a": "b c", "k": ""}


# -- the standalone worker killed with SIGKILL --------------------------------------------

TABLE_CASES = {
    # type, instance flags at open, request flags
    "hash-lock": ("hash", 0, D.LOCKED_WRITE),
    # verify(8)'s cache: OPEN_LOCK held for the life of the worker
    "btree-openlock": ("btree", F.OPEN_LOCK, D.LOCKED_WRITE),
    "lmdb-lock": ("lmdb", 0, D.LOCKED_WRITE),
}


@pytest.fixture
def worker_setup(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    specs = {t: f"{t}:{tables}/data-{t}" for t in ("hash", "btree", "lmdb")}
    inst = WorkerInstance(tmp_path, write_maps=" ".join(f"proxy:{s}" for s in specs.values()))
    try:
        yield inst, specs
    finally:
        inst.stop()


def writers_under_worker_kills(inst, start_writers, kills, seed, **killer_options):
    """Start proxywrite, then the writers `start_writers(socket path)`
    returns (already started), and kill proxywrite with SIGKILL (restarting
    it each time) until they are done. Returns (writers, killer)."""
    path = inst.socket_path("proxywrite")
    current = {"proc": inst.start("proxywrite")}

    def victim():
        proc = current["proc"]
        return proc.pid if proc.poll() is None else None

    def revive(_pid):
        current["proc"].wait(10)
        current["proc"] = inst.start("proxywrite")

    writers = start_writers(path)
    killer = D.Killer(victim, revive, kills, seed, **killer_options)
    killer.start()
    try:
        D.join_all(writers, 240)
    finally:
        killer.stop.set()
        killer.join(30)
    assert killer.error is None, killer.error
    return writers, killer


def run_with_worker_kills(inst, spec, open_flags, flags, clients, per_client, kills, seed):
    ledger = D.Ledger()
    writers, killer = writers_under_worker_kills(
        inst, lambda path: D.run_writers(path, spec, ledger, clients, per_client, seed,
                                         flags=flags, open_flags=open_flags),
        kills, seed)
    errors = [w.error for w in writers if w.error]
    assert not errors, errors
    inst.stop()  # the file is checked with nobody holding it
    return ledger, killer.kills


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_worker_sigkill_loses_no_acknowledged_update(worker_setup, case):
    inst, specs = worker_setup
    type_name, open_flags, flags = TABLE_CASES[case]
    per_client = 2500
    ledger, kills = run_with_worker_kills(inst, specs[type_name], open_flags, flags,
                                          clients=4, per_client=per_client, kills=20,
                                          seed=SEED + len(case))
    figures = D.check_table(inst.config_dir, specs[type_name], D.expected_states(ledger))
    report(f"worker SIGKILL {case}", ledger, figures, kills)
    assert kills >= 1, "the worker was never killed: the run proves nothing"
    assert ledger.acked >= 4 * per_client


class PipelinedWriter(threading.Thread):
    """Sends its updates in batches of `batch` requests written at once, so
    that proxywrite reads them in one loop pass and commits them as one
    group (one sync, then the replies). Each key is written once; a reply
    OK acknowledges it, a lost or RETRY reply leaves it unknown."""

    def __init__(self, path: str, spec: str, ledger: D.Ledger, prefix: str, batches: int,
                 batch: int = 16):
        super().__init__(daemon=True)
        self.path, self.spec, self.ledger, self.prefix = path, spec, ledger, prefix
        self.batches, self.batch = batches, batch
        self.error: str | None = None

    def run(self) -> None:
        from proxymap.protocol import encode
        from tests.worker_fixture import RawClient
        client = None
        try:
            for b in range(self.batches):
                keys = [f"{self.prefix}{b}-{i}" for i in range(self.batch)]
                deadline = time.monotonic() + 60      # a restart under load is slow
                while client is None:
                    try:
                        client = RawClient(self.path)
                    except OSError:
                        if time.monotonic() > deadline:
                            raise AssertionError("proxywrite never came back") from None
                        time.sleep(0.02)
                data = b"".join(encode([("request", "update"), ("table", self.spec),
                                        ("flags", D.LOCKED_WRITE), ("key", k),
                                        ("value", f"{k}-g")]) for k in keys)
                answered = 0
                try:
                    client.send(data)
                    for k in keys:
                        status = int(dict(client.read())[b"status"])
                        answered += 1
                        self.ledger.record(k, f"{k}-g", True if status == 0 else None)
                except (OSError, EOFError):
                    client.close()
                    client = None
                    for k in keys[answered:]:
                        self.ledger.record(k, f"{k}-g", None)
        except Exception as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if client is not None:
                client.close()


@pytest.mark.slow
def test_worker_sigkill_in_the_middle_of_commit_groups(worker_setup):
    """Four clients pipeline 16 updates at a time, so proxywrite spends its
    time applying and syncing groups of changes (lmdb: Berkeley DB files
    are not grouped, see berkeleydb.py); it is killed with SIGKILL at
    random moments, most of which fall inside a group. No update answered
    OK may be missing afterwards, and the file must stay valid."""
    inst, specs = worker_setup
    spec = specs["lmdb"]
    ledger = D.Ledger()

    def start_writers(path):
        writers = [PipelinedWriter(path, spec, ledger, f"g{i}-", batches=500) for i in range(4)]
        for w in writers:
            w.start()
        return writers

    writers, killer = writers_under_worker_kills(inst, start_writers, 15, SEED + 11,
                                                 pause=(0.02, 0.2))
    path = inst.socket_path("proxywrite")
    # one more round without kills: the last worker's summary shows the groups
    tail = [PipelinedWriter(path, spec, ledger, f"t{i}-", batches=5) for i in range(4)]
    for w in tail:
        w.start()
    D.join_all(tail, 120)
    errors = [w.error for w in writers + tail if w.error]
    assert not errors, errors
    inst.stop()
    figures = D.check_table(inst.config_dir, spec, D.expected_states(ledger))
    report("worker SIGKILL during commit groups (lmdb)", ledger, figures, killer.kills)
    assert killer.kills >= 1, "the worker was never killed: the run proves nothing"
    summary = [line.split("commit groups: ")[1].split() for line in inst.log().splitlines()
               if "commit groups: " in line]
    assert summary, "no commit group was logged"
    changes, syncs = int(summary[-1][0]), int(summary[-1][3])
    assert changes > syncs, f"no group had more than one change: {summary[-1]}"


# -- real postmap writing the same file while proxywrite updates ------------------------------

class PostmapWriter(threading.Thread):
    """Real Postfix writing the table, as an administrator would: `postmap
    -i` adding a batch of keys from stdin directly to the file, now and
    then `postmap -d KEY proxy:...` deleting one of them. Exit status 0
    counts as acknowledgement (for -d: that key was deleted).

    Why -d goes through proxywrite: Postfix 3.7's direct `postmap -d`
    drops its exclusive flock right after the delete and writes the
    changed pages back only when it closes the table (seen with strace:
    flock(LOCK_UN), then pwrite64/fdatasync). Its write-back is thus
    unlocked and can overwrite pages another writer stored meanwhile (or
    be overwritten); no lock discipline on our side can prevent that.
    `postmap -i` keeps its lock until after its final sync."""

    def __init__(self, etc: str, spec: str, ledger: D.Ledger, rounds: int, batch: int,
                 seed: int):
        super().__init__(daemon=True)
        self.config_dir, self.spec, self.ledger = etc, spec, ledger
        self.rounds, self.batch = rounds, batch
        self.rng = random.Random(seed)
        self.error: str | None = None
        self.runs = 0

    def run(self) -> None:
        try:
            live: list[str] = []
            for r in range(self.rounds):
                keys = [f"p{r}-{i}" for i in range(self.batch)]
                text = "".join(f"{k} {k}-postmap{r}\n" for k in keys)
                result = D.postmap(self.config_dir, "-i", self.spec, input=text)
                self.runs += 1
                if result.returncode != 0 or result.stderr:
                    raise AssertionError(f"postmap -i: {result.returncode} {result.stderr}")
                for k in keys:
                    self.ledger.record(k, f"{k}-postmap{r}", True)
                live += keys
                if r % 2:
                    key = live.pop(self.rng.randrange(len(live)))
                    result = D.postmap(self.config_dir, "-d", key, f"proxy:{self.spec}")
                    self.runs += 1
                    if result.returncode != 0 or result.stderr:
                        raise AssertionError(f"postmap -d {key}: lost, or failed:"
                                             f" {result.returncode} {result.stderr}")
                    self.ledger.record(key, D.ABSENT, True)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["btree", "hash"])
def test_real_postmap_and_proxywrite_share_the_file(worker_setup, type_name):
    inst, specs = worker_setup
    spec = specs[type_name]
    source = spec.split(":", 1)[1]
    with open(source, "w") as f:
        f.write("seed seed-value\n")
    built = D.postmap(inst.config_dir, spec)
    assert built.returncode == 0, built.stderr
    inst.start("proxywrite")
    ledger = D.Ledger()
    ledger.record("seed", "seed-value", True)
    writers = D.run_writers(inst.socket_path("proxywrite"), spec, ledger, 3, 1500,
                            SEED, flags=D.LOCKED_WRITE)
    admin = PostmapWriter(inst.config_dir, spec, ledger, rounds=60, batch=25, seed=SEED)
    admin.start()
    D.join_all(writers + [admin], 240)
    errors = [w.error for w in writers + [admin] if w.error]
    assert not errors, errors
    # proxywrite's own view, through the running worker, must agree too
    states = D.expected_states(ledger)
    inst.stop()
    figures = D.check_table(inst.config_dir, spec, states)
    report(f"proxywrite + real postmap -i/-d ({type_name}, {admin.runs} postmap runs)",
           ledger, figures)


# -- the table re-reads the file under its write lock (in-process, deterministic) ----------------

@pytest.fixture
def postfix_etc(tmp_path):
    inst = WorkerInstance(tmp_path)
    return inst.config_dir


def _foreign_add(etc: str, spec: str, key: str, value: str) -> None:
    """Real postmap -i adding one record directly to the file."""
    result = D.postmap(etc, "-i", spec, input=f"{key} {value}\n")
    assert result.returncode == 0 and not result.stderr, result.stderr


@pytest.mark.parametrize("type_name", ["hash", "btree"])
def test_write_after_foreign_write_keeps_it(tmp_path, postfix_etc, type_name):
    from proxymap.tables import open_table
    spec = f"{type_name}:{tmp_path}/t"
    table = open_table(spec, F.LOCK, True, {})
    try:
        table.flags |= F.LOCK | F.SYNC_UPDATE | F.DUP_REPLACE
        assert table.update(b"ours1", b"a")
        _foreign_add(postfix_etc, spec, "theirs", "b")
        # No dispatcher in between (it would reopen on the changed stamp):
        # the table itself must notice the change under its write lock.
        # Enough writes that some share a page with the foreign record.
        for n in range(200):
            assert table.update(b"more%d" % n, b"c")
    finally:
        table.close()
    expected = {"ours1": "a", "theirs": "b", **{f"more{n}": "c" for n in range(200)}}
    assert D.dump_table(postfix_etc, spec) == expected


@pytest.mark.parametrize("type_name", ["hash", "btree"])
def test_foreign_write_in_the_same_clock_tick_is_noticed(tmp_path, postfix_etc, type_name,
                                                         monkeypatch):
    """With coarse file times another writer may leave exactly the mtime of
    our own last write; our own write's stamp must still differ from it."""
    from proxymap.tables import open_table
    spec = f"{type_name}:{tmp_path}/t"
    path = f"{tmp_path}/t.db"
    table = open_table(spec, F.LOCK, True, {})
    written = []  # the file time our write got from the kernel
    commit = table._commit

    def commit_and_note():
        commit()
        written.append(os.stat(path).st_mtime_ns)
    monkeypatch.setattr(table, "_commit", commit_and_note)
    try:
        table.flags |= F.LOCK | F.SYNC_UPDATE | F.DUP_REPLACE
        assert table.update(b"ours1", b"a")
        size = os.stat(path).st_size
        _foreign_add(postfix_etc, spec, "theirs", "b")
        assert os.stat(path).st_size == size, "the foreign record grew the file: no test"
        # simulate a clock tick that had not advanced: the foreign write
        # stamps the file with the very time of our own write
        os.utime(path, ns=(written[-1], written[-1]))
        assert table.changed()
        assert table.update(b"ours2", b"c")
    finally:
        table.close()
    assert D.dump_table(postfix_etc, spec) == {"ours1": "a", "theirs": "b", "ours2": "c"}


# -- Berkeley DB: a sync that fails half-way (a full disk) -------------------------------------

#: A table of ours in a process of its own, driven one command a line. Its
#: file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every write past
#: the file's present end fail, as on a full disk: libdb writes the pages
#: of a change that lie inside the file and fails on those beyond it.
SYNC_FAILURE_CHILD = """
import os, resource, signal, sys
from proxymap import dictflags as F
from proxymap.tables import open_table
from proxymap.tables.base import TableError
spec, path = sys.argv[1], sys.argv[2]
table = open_table(spec, F.LOCK, True, {})
table.flags |= F.LOCK | F.SYNC_UPDATE | F.DUP_REPLACE
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
for line in sys.stdin:
    command, *args = line.split()
    reply = "done"
    if command == "full":
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.stat(path).st_size, resource.RLIM_INFINITY))
    elif command == "space":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    elif command == "update":
        try:
            reply = "ok" if table.update(args[0].encode(), args[1].encode() * int(args[2])) else "refused"
        except TableError:
            reply = "retry"
    elif command == "lookup":
        reply = repr(table.lookup(args[0].encode()))
    elif command == "close":
        table.close()
    print(reply, flush=True)
"""


@pytest.mark.parametrize("type_name", ["hash", "btree"])
@pytest.mark.parametrize("size,undo_fits", [(3000, True), (20000, False)])
def test_failed_sync_leaves_no_trace_of_an_update_answered_retry(tmp_path, postfix_etc, type_name,
                                                                 size, undo_fits):
    """libdb syncs a change page by page; when a write fails half-way the
    pages inside the file are written and those beyond it are not. Before:
    the table closed with DB_NOSYNC and answered RETRY, but real
    `postmap -s` then failed on the torn file ("error ... seeking"), db5.3_verify
    rejected it, and it stayed so. Now the change is undone and synced
    again: a value of one overflow page is undone at once (the file
    verifies while the disk is still full); a larger one frees pages past
    the end that cannot be written yet, and is written back before the next
    change. Either way a fresh reader never finds the update answered
    RETRY, and the file verifies."""
    import subprocess
    import sys
    spec, path = f"{type_name}:{tmp_path}/t", f"{tmp_path}/t.db"
    with open(f"{tmp_path}/t", "w") as f:
        f.write("".join(f"seed{n} {'x' * 100}\n" for n in range(10)))
    assert D.postmap(postfix_etc, spec).returncode == 0
    seeded = D.dump_table(postfix_etc, spec)
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen([sys.executable, "-c", SYNC_FAILURE_CHILD, spec, path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def ask(line: str) -> str:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return child.stdout.readline().strip()
    try:
        assert ask("full") == "done"
        assert ask(f"update big v {size}") == "retry"
        assert ask(f"update seed0 w {size}") == "retry"
        if undo_fits:                                       # a fresh reader
            assert D.dump_table(postfix_etc, spec) == seeded
            verify = D.db_verify(path)
            assert verify.returncode == 0, verify.stderr
        assert ask("lookup big") == "None"                  # our own handle
        assert ask("lookup seed0") == repr(b"x" * 100)
        assert ask("space") == "done"
        assert ask("update after space 1") == "ok"
        assert ask("close") == "done"
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        log.close()
    verify = D.db_verify(path)
    assert verify.returncode == 0, verify.stderr
    assert D.dump_table(postfix_etc, spec) == {**seeded, "after": "space"}
    log_text = (tmp_path / "child.log").read_text()
    assert "Traceback" not in log_text
    assert ("may hold part of a failed change" in log_text) == (not undo_fits)


# -- our master killed with SIGKILL -----------------------------------------------------------------

@pytest.mark.slow
def test_master_sigkill_loses_no_acknowledged_update(tmp_path):
    from master.pidfile import pid_alive
    from tests.instance import temporary_instance
    psutil = pytest.importorskip("psutil")
    with temporary_instance(tmp_path) as inst:
        spec = inst.write_table
        inst.start()

        orphans: list[int] = []

        def victim():
            pid = inst.master_pid()
            if pid is not None:
                try:
                    orphans[:] = [c.pid for c in psutil.Process(pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    return None
            return pid

        def revive(pid):
            # the master's workers must go away by themselves, so that a new
            # master never runs a second proxywrite next to an orphan
            deadline = time.monotonic() + 20
            while any(map(pid_alive, [pid] + orphans)) and time.monotonic() < deadline:
                time.sleep(0.02)
            left = [p for p in [pid] + orphans if pid_alive(p)]
            assert not left, f"still alive after the master's SIGKILL: {left}"
            inst.start()

        ledger = D.Ledger()
        for key, value in (("k1", "v1"), ("k2", "v2"), ("k3", "v3")):
            ledger.record(key, value, True)  # built by real postmap
        writers = D.run_writers(inst.socket_path("proxywrite"), spec, ledger, 4, 2500,
                                SEED, tag="m", flags=D.LOCKED_WRITE,
                                open_flags=F.OPEN_LOCK)
        killer = D.Killer(victim, revive, 6, SEED, pause=(0.2, 0.6))
        killer.start()
        try:
            D.join_all(writers, 240)
        finally:
            killer.stop.set()
            killer.join(60)
        assert killer.error is None, killer.error
        errors = [w.error for w in writers if w.error]
        assert not errors, errors
        inst.stop()
        figures = D.check_table(inst.config_dir, spec, D.expected_states(ledger))
        report("master SIGKILL (btree with OPEN_LOCK, proxywrite under our master)", ledger, figures,
               killer.kills)
        assert killer.kills >= 1, "the master was never killed: the run proves nothing"
