"""Helpers for the durability tests: writers that record what was
acknowledged, a seeded killer, and checks with real Postfix tools.

They mirror what a Postfix client of proxywrite relies on: once an update
or delete has been answered OK (or a delete NOKEY: the key is absent), the
change is synced to the table file (SYNC_UPDATE, spec 9.6) and survives a
crash of the server; the file stays a valid Berkeley DB / LMDB file that
real `postmap` and `db5.3_verify` accept.

`Ledger` keeps, per key, the outcome of every operation a writer attempted;
`expected_states` turns that into the states each key may be in afterwards.
A writer is the only one touching its keys and sends its operations one
after another, so only an operation whose answer was lost (the server died)
leaves two possible states: before or after it.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

from proxymap import dictflags as F
from proxymap.client import NOKEY, OK, RETRY, ProxyClient, ProxyError
from tests.instance import POSTMAP

DB_VERIFY = "/usr/bin/db5.3_verify"

ABSENT = None  # the state of a deleted / never written key

#: request flags of a locking writer: LOCK (exclusive flock around each
#: change), as `postmap -d proxy:...` sends them (524353)
LOCKED_WRITE = F.UTF8_REQUEST | F.LOCK | F.DUP_WARN


class Ledger:
    """Thread-safe record of operations: per key a list of
    (value or ABSENT, acknowledged: True / None for unknown)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ops: dict[str, list[tuple[str | None, bool | None]]] = {}
        self.attempted = 0
        self.acked = 0
        self.unknown = 0

    def record(self, key: str, state: str | None, acked: bool | None) -> None:
        with self._lock:
            self.ops.setdefault(key, []).append((state, acked))
            self.attempted += 1
            if acked:
                self.acked += 1
            else:
                self.unknown += 1


def possible_states(history: list[tuple[str | None, bool | None]]) -> set:
    """The states a key may be in after `history` (oldest first): the state
    of the last acknowledged operation, plus that of every later operation
    whose answer was lost."""
    states = {ABSENT}
    for state, acked in history:
        if acked:
            states = {state}
        else:
            states = states | {state}
    return states


def expected_states(ledger: Ledger) -> dict[str, set]:
    return {key: possible_states(history) for key, history in ledger.ops.items()}


# -- writers -------------------------------------------------------------------------

class Writer(threading.Thread):
    """One proxywrite client: `count` operations on its own keys
    (`prefix`0, 1, ...), mostly new updates, some replacements and deletes,
    chosen by a seeded RNG. A lost answer is recorded as unknown and the
    operation is sent again on a new connection until answered (bounded);
    so is one answered RETRY (the server did not do it, e.g. its lock wait
    ran out)."""

    def __init__(self, path: str, table: str, ledger: Ledger, prefix: str, count: int,
                 seed: int, flags: int = LOCKED_WRITE, open_flags: int = 0,
                 give_up_after: float = 60.0):
        super().__init__(daemon=True)
        self.path = path
        self.table = table
        self.ledger = ledger
        self.prefix = prefix
        self.count = count
        self.rng = random.Random(seed)
        self.flags = open_flags | flags
        self.open_flags = open_flags
        self.give_up_after = give_up_after
        self.error: str | None = None
        self.client = ProxyClient(path, timeout=30, retries=0)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported by the test, never silently lost
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.client.close()

    def _run(self) -> None:
        live: list[str] = []
        serial = 0
        for n in range(self.count):
            roll = self.rng.random()
            if live and roll < 0.15:
                key = live.pop(self.rng.randrange(len(live)))
                state = ABSENT
            elif live and roll < 0.35:
                key = live[self.rng.randrange(len(live))]
                state = f"{key}-v{n}"
            else:
                key = f"{self.prefix}{serial}"
                serial += 1
                live.append(key)
                state = f"{key}-v{n}"
            self._apply(key, state)

    def _apply(self, key: str, state: str | None) -> None:
        deadline = time.monotonic() + self.give_up_after
        while True:
            try:
                if self.client.sock is None:
                    self.client.connect()
                    status, _ = self.client.open(self.table, self.open_flags)
                    if status != OK:
                        raise ProxyError(f"open status {status}")
                if state is ABSENT:
                    (status,) = self.client.delete(self.table, self.flags, key.encode())
                    done = status in (OK, NOKEY)
                else:
                    (status,) = self.client.update(self.table, self.flags, key.encode(),
                                                   state.encode())
                    done = status == OK
                if status == RETRY:  # e.g. the lock wait ran out: not done, send again
                    raise ProxyError(f"{key}: status RETRY")
                if not done:
                    raise AssertionError(f"{key}: unexpected status {status}")
                self.ledger.record(key, state, True)
                return
            except ProxyError:
                self.client.close()
                self.ledger.record(key, state, None)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def run_writers(path: str, table: str, ledger: Ledger, clients: int, per_client: int,
                seed: int, tag: str = "w", **kw) -> list[Writer]:
    writers = [Writer(path, table, ledger, f"{tag}{i}-", per_client, seed * 1000 + i, **kw)
               for i in range(clients)]
    for w in writers:
        w.start()
    return writers


def join_all(threads, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {timeout:g}s: {stuck}"


class Killer(threading.Thread):
    """Kills with SIGKILL, at seeded random moments, whatever `victim()`
    returns (a pid), at most `kills` times, then calls `revive()` after
    each kill. Stops early when `stop` is set."""

    def __init__(self, victim, revive, kills: int, seed: int, pause=(0.05, 0.4)):
        super().__init__(daemon=True)
        self.victim = victim
        self.revive = revive
        self.kills_wanted = kills
        self.rng = random.Random(seed)
        self.pause = pause
        self.stop = threading.Event()
        self.kills = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            while self.kills < self.kills_wanted and not self.stop.is_set():
                if self.stop.wait(self.rng.uniform(*self.pause)):
                    break
                pid = self.victim()
                if pid is None:
                    continue
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    continue
                self.kills += 1
                self.revive(pid)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


# -- checks with real Postfix tools ------------------------------------------------------

def postmap(etc: str, *args, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([POSTMAP, "-c", etc, *args], input=input, capture_output=True,
                          text=True, timeout=120)


def dump_table(etc: str, spec: str) -> dict[str, str]:
    """Every record of `spec` as real `postmap -s` prints it."""
    result = postmap(etc, "-s", spec)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return parse_listing(result.stdout)


def parse_listing(text: str) -> dict[str, str]:
    """`key<TAB>value` lines (postmap -s / -q -) as a dict."""
    records = {}
    for line in text.splitlines():
        key, sep, value = line.partition("\t")
        assert sep, f"malformed postmap line {line!r}"
        records[key] = value
    return records


def query_keys(etc: str, spec: str, keys) -> dict[str, str]:
    """The keys real `postmap -q -` finds in `spec`, with their values."""
    result = postmap(etc, "-q", "-", spec, input="".join(f"{k}\n" for k in keys))
    assert result.returncode in (0, 1) and not result.stderr, result.stderr
    return parse_listing(result.stdout)


def db_verify(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([DB_VERIFY, path], capture_output=True, text=True, timeout=120)


def mismatches(states: dict[str, set], found: dict[str, str]) -> list[str]:
    """Keys whose value in `found` is not one of their possible states."""
    bad = []
    for key, allowed in states.items():
        got = found.get(key, ABSENT)
        if got not in allowed:
            bad.append(f"{key}: found {got!r}, expected one of {sorted(allowed, key=str)}")
    return bad


def check_table(etc: str, spec: str, states: dict[str, set]) -> dict[str, int]:
    """Assert that the table file verifies and that every key is in one of
    its possible states, by `postmap -s` and by `postmap -q -`. Returns
    figures for the report."""
    type_name, _, name = spec.partition(":")
    if type_name in ("hash", "btree"):
        verdict = db_verify(name + ".db")
        assert verdict.returncode == 0, f"db5.3_verify {name}.db: {verdict.stdout}{verdict.stderr}"
    listing = dump_table(etc, spec)
    bad = mismatches(states, listing)
    assert not bad, f"{len(bad)} keys wrong in postmap -s output: {bad[:10]}"
    queried = query_keys(etc, spec, sorted(states))
    bad = mismatches(states, queried)
    assert not bad, f"{len(bad)} keys wrong in postmap -q - output: {bad[:10]}"
    definite = sum(1 for s in states.values() if len(s) == 1)
    present = sum(1 for k in states if k in listing)
    return {"keys": len(states), "definite": definite, "present": present,
            "records": len(listing)}
