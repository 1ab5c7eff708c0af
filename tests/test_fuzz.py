"""Hostile input: property tests of the codec and request parser, and
socket fuzz runs against a standalone worker and against our master.

The property tests add to tests/test_protocol.py (which covers the
documented cases, chunked well-formed input and garbage not raising):
here the decoder must give the same answer however its input is cut, its
limits must hold exactly, integers must parse as real Postfix parses them
(libc's sscanf is the oracle), and the dispatcher must answer any list
whatever with exactly one well-formed reply.

The socket runs send generated, mutated and random requests
(tests/fuzzing.py) over many connections and check every reply; the long
master run (`slow`) writes its figures to `fuzz-figures.json` in its
instance directory, prints them (visible with -s) and attaches them to
the test report with `record_property` (visible in --junitxml output).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import threading
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fuzzing import (attr_lists, fuzz_connection, hostile_lists, numbers, ReplyTally,
                     reply_problem, requests)
from proxymap.dispatch import Dispatcher
from proxymap.protocol import (BAD, BadRequest, Decoder, ProtocolError, Request, encode,
                               encode_reply, parse_request, parse_uint)
from worker_fixture import WorkerInstance

# -- the decoder ---------------------------------------------------------------------

def feed_in_pieces(decoder: Decoder, data: bytes, cuts) -> list:
    out, pos = [], 0
    for cut in cuts:
        out += decoder.feed(data[pos:pos + cut])
        pos += cut
    return out + decoder.feed(data[pos:])


def outcome(decoder: Decoder, data: bytes, cuts):
    try:
        return feed_in_pieces(decoder, data, cuts), decoder.pending
    except ProtocolError:
        return "closed"


@given(st.binary(max_size=400), st.lists(st.integers(1, 30), max_size=30),
       st.integers(1, 8), st.integers(8, 200))
def test_any_garbage_decodes_the_same_however_it_is_cut(data, cuts, max_attrs, max_message):
    """Chunk boundaries change neither the lists found, nor what stays
    pending, nor whether a limit is broken."""
    whole = outcome(Decoder(max_attrs, max_message), data, [])
    assert outcome(Decoder(max_attrs, max_message), data, cuts) == whole


@given(st.lists(attr_lists, min_size=1, max_size=4), st.lists(st.integers(1, 50), max_size=20),
       st.integers(1, 10), st.integers(10, 200))
def test_limits_hold_exactly(messages, cuts, max_attrs, max_message):
    """A list is refused iff it has more than max_attrs attributes or more
    than max_message bytes (terminator excluded); within the limits every
    list comes out intact."""
    data = b"".join(encode(m) for m in messages)
    within = all(len(m) <= max_attrs and len(encode(m)) - 1 <= max_message for m in messages)
    got = outcome(Decoder(max_attrs, max_message), data, cuts)
    if within:
        assert got == ([list(m) for m in messages], 0)
    else:
        assert got == "closed"


@given(st.lists(st.tuples(st.sampled_from(["status", "flags", "key", "value", "x"]),
                          st.one_of(st.integers(-(1 << 40), 1 << 40),
                                    st.binary(max_size=30).filter(lambda b: b"\0" not in b),
                                    st.text(max_size=10).filter(lambda t: "\0" not in t))),
                max_size=8))
def test_decode_of_encode_is_identity(pairs):
    """Strings come back as their bytes, integers as unsigned 32-bit text."""
    def as_bytes(v):
        if isinstance(v, int):
            return str(v & 0xFFFFFFFF).encode()
        return v.encode() if isinstance(v, str) else v
    (decoded,) = Decoder().feed(encode(pairs))
    assert decoded == [(n.encode(), as_bytes(v)) for n, v in pairs]


def test_list_terminator_right_after_a_value_and_empty_lists():
    d = Decoder()
    assert d.feed(b"\0\0a\0\0\0") == [[], [], [(b"a", b"")]]
    assert d.pending == 0


# -- integers: real Postfix parses them with sscanf("%u%c") and refuses junk -----------

_libc = ctypes.CDLL(None)


def sscanf_u(text: bytes) -> int | None:
    """libc's answer: the value, or None where Postfix logs 'malformed
    numerical data' (no number, or any byte after it)."""
    value, junk = ctypes.c_uint(0), ctypes.c_char(b"\0")
    n = _libc.sscanf(text, b"%u%c", ctypes.byref(value), ctypes.byref(junk))
    return value.value if n == 1 else None


def parse_or_none(text: bytes) -> int | None:
    try:
        return parse_uint(text)
    except ValueError:
        return None


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b" +1", 1), (b"\t\n1", 1), (b"4294967297", 1), (b"-1", 4294967295),
    (b"-4294967296", 0), (b"99999999999999999999999", 4294967295),
    (b"0 ", None), (b"0abc", None), (b"1\n", None), (b"- 1", None), (b"0x10", None),
    (b"", None), (b"+", None), (b"+-1", None)])
def test_integers_parse_as_postfix_does(text, value):
    """The cases a fake server checked against real `postmap -q` (a reply
    status of `0 ` or `0abc` is refused by Postfix; 4294967297 is 1)."""
    assert parse_or_none(text) == value
    assert sscanf_u(text) == value


@given(st.one_of(numbers, st.from_regex(rb"\A[ \t\n]*[+-]?[0-9]{0,25}[ a-z]?\Z")
                 .filter(lambda b: b"\0" not in b)))
def test_integer_parsing_matches_libc_sscanf(text):
    assert parse_or_none(text) == sscanf_u(text)


# -- the request parser and the dispatcher -------------------------------------------

@given(requests())
def test_well_formed_requests_round_trip_through_the_codec(pairs):
    (attrs,) = Decoder().feed(encode(pairs))
    req = parse_request(attrs)
    fields = dict(pairs)
    assert isinstance(req, Request) and req.name == fields["request"]
    assert req.table == fields["table"]
    assert req.layout == (311 if "instance_flags" in fields else 37)
    for name in ("key", "value"):
        if name in fields:
            assert getattr(req, name) == fields[name]
    if "function" in fields:
        assert req.function == fields["function"]
    if req.name != "open" or req.layout == 37:
        assert req.flags == fields["flags"]


@given(st.one_of(hostile_lists(), attr_lists))
def test_parser_raises_only_bad_request_and_names_a_real_request(attrs):
    try:
        parse_request(attrs)
    except BadRequest as exc:
        assert exc.name is None or exc.name in ("open", "lookup", "update", "delete", "sequence")
        assert exc.layout in (37, 311)
        assert reply_problem(Decoder().feed(encode_reply(exc.name, BAD, exc.layout))[0]) is None


ALLOWED = {"inline:{alpha=one, beta=two}", "static:{hello}", "fail:oops"}


@pytest.fixture(scope="module")
def dispatchers():
    return [Dispatcher("proxymap", ALLOWED, {}), Dispatcher("proxywrite", ALLOWED, {})]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(hostile_lists(), attr_lists,
                 requests(tables=tuple(ALLOWED) + ("hash:/nonexistent", "nocolon"))))
def test_reply_to_any_list_is_one_well_formed_reply(dispatchers, attrs):
    attrs = [(n.encode() if isinstance(n, str) else n,
              v if isinstance(v, bytes) else str(v).encode()) for n, v in attrs]
    for d in dispatchers:
        lists = Decoder().feed(d.handle(attrs))
        assert len(lists) == 1
        assert reply_problem(lists[0]) is None
        try:
            req = parse_request(attrs)
        except BadRequest:
            continue
        names = [n for n, _ in lists[0]]
        # the reply has the layout of the request it answers
        assert (b"flags" in names) == (req.name == "open" or req.layout == 311)
        assert (b"value" in names) == (req.name in ("lookup", "sequence"))


# -- socket fuzzing: a standalone worker ------------------------------------------------

TABLES = ["inline:{alpha=one, beta=two}", "static:{hello world}", "inline:{sentinel=sentinel-ok}"]
SENTINEL = encode([("request", "lookup"), ("table", TABLES[2]), ("flags", 524353),
                   ("key", "sentinel")])
MAX_ATTRS, MAX_MESSAGE = 16, 4096


def check_connection(result, problems: list) -> None:
    problems += result.tally.problems
    if result.expected_lists is None:
        if not result.closed:
            problems.append("a framing limit was broken but the connection stayed open")
    elif not result.sentinel_ok or result.replies != result.expected_lists:
        problems.append(f"{result.replies} replies, {result.expected_lists} lists sent, "
                        f"closed={result.closed} sentinel={result.sentinel_ok}")


def test_fuzz_standalone_worker(tmp_path):
    """5000 hostile messages over 100 connections to one worker: every
    list answered with a valid reply (or, after a framing violation, the
    connection closed), the worker alive and still correct."""
    inst = WorkerInstance(tmp_path, read_maps=" ".join(f"proxy:{t}" for t in TABLES),
                          extra=f"proxymap_max_request_size = {MAX_MESSAGE}\n"
                                f"proxymap_max_attributes = {MAX_ATTRS}\n"
                                # every fuzzed list must get its reply: no
                                # hanging up after a run of BAD ones
                                "proxymap_max_bad_requests = 0\n")
    proc = inst.start()
    try:
        rng = random.Random(20240611)
        problems, tally, closed = [], ReplyTally(), 0
        for _ in range(100):
            result = fuzz_connection(inst.socket_path(), rng, 50, TABLES[:2],
                                     ("alpha", "beta", "gamma"), SENTINEL, b"sentinel-ok",
                                     max_attrs=MAX_ATTRS, max_message=MAX_MESSAGE)
            check_connection(result, problems)
            tally.merge(result.tally)
            closed += result.closed
        print(f"\nFIGURES standalone fuzz: replies {dict(tally.by_status)}, closed by server {closed}")
        assert problems == []
        assert proc.poll() is None
        assert tally.by_status["BAD"] > 1000 and tally.by_status["OK"] > 100
        assert 0 < closed < 100
        assert "Traceback" not in inst.log()
    finally:
        inst.stop()


# -- socket fuzzing: our master ---------------------------------------------------------

FUZZ_REQUESTS = 100_000
PER_CONNECTION = 40
THREADS = 8
#: bounds for the server processes after the run, against before: a few
#: descriptors, plus at most 2 per table instance a worker may open (8 per
#: listed table: dispatch.INSTANCE_KEY_BITS has 3 bits) for 3 tables
FD_GROWTH = 8 + 2 * 8 * 3
RSS_GROWTH = 64 * 1024 * 1024  # bytes
CRASH = re.compile(r"pid \d+ (exit status|killed by signal)|Traceback|panic|fatal:")


def server_processes(master_pid: int) -> dict[int, psutil.Process]:
    master = psutil.Process(master_pid)
    return {p.pid: p for p in [master] + master.children()}


def usage(procs: dict[int, psutil.Process]) -> dict[int, tuple[int, int]]:
    out = {}
    for pid, p in procs.items():
        try:
            out[pid] = (p.num_fds(), p.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_fuzz_master_100k_requests(tmp_path, record_property):
    from tests.instance import READ_ENTRIES, WRITE_ENTRIES, temporary_instance, wait_for
    # large max_use: the same workers must live through the whole run, so a
    # changed pid can only mean a crash and their fd/RSS are comparable.
    # A quarter of the connections go to proxywrite. Its sentinel lives in a
    # table the fuzzer never names: fuzzed updates with TRY0NULL flags
    # legitimately leave a fuzzed table with mixed NUL conventions, after
    # which Postfix's narrowing rule can hide a key stored the other way.
    with temporary_instance(tmp_path, main_extra={
            "max_use": "1000000", "proxymap_max_request_size": str(MAX_MESSAGE * 4),
            "proxymap_max_attributes": str(MAX_ATTRS),
            "proxymap_max_bad_requests": "0"}) as inst:
        root = inst.root
        lmdb_table = f"lmdb:{root}/tables/fuzz"
        # The sentinel's value lives in no fuzzed table: a fuzzed sequence
        # walk would return it and end a connection's reading early (now
        # that an OPEN_LOCK holder's lock is given back when it leaves,
        # such walks are answered instead of RETRY).
        inst.make_tables(dict(WRITE_ENTRIES))
        with open(f"{root}/tables/fuzz", "w") as f:
            f.write("k1 v1\n")
        inst.postmap(lmdb_table, check=True)
        sentinel_table = f"btree:{root}/tables/sentinel"
        with open(f"{root}/tables/sentinel", "w") as f:
            f.write("fuzz-sentinel sentinel-ok\n")
        inst.postmap(sentinel_table, check=True)
        if os.geteuid() == 0:
            import shutil
            shutil.chown(f"{root}/tables/fuzz.lmdb", "postfix", "postfix")
            shutil.chown(f"{root}/tables/sentinel.db", "postfix", "postfix")
        inst.write_main_cf(proxy_read_maps=f"proxy:{inst.read_table} proxy:{inst.write_table} "
                                           f"proxy:{lmdb_table} proxy:{sentinel_table}",
                           proxy_write_maps=f"proxy:{lmdb_table} proxy:{sentinel_table}")
        inst.run_foreground()
        master_pid = inst.procs[0].pid
        keys = tuple(READ_ENTRIES) + tuple(WRITE_ENTRIES)
        plan = {  # service: tables fuzzed, sentinel request
            "proxymap": ([inst.read_table, inst.write_table, lmdb_table],
                         encode([("request", "lookup"), ("table", sentinel_table),
                                 ("flags", 524353), ("key", "fuzz-sentinel")])),
            "proxywrite": ([lmdb_table, inst.read_table],
                           encode([("request", "lookup"), ("table", sentinel_table),
                                   ("flags", 524353), ("key", "fuzz-sentinel")])),
        }

        def run_share(seed, count, problems, tallies, stats):
            rng = random.Random(seed)
            tally, sent, closed = ReplyTally(), 0, 0
            for i in range(count):
                service = "proxywrite" if i % 4 == 3 else "proxymap"
                tables, sentinel = plan[service]
                result = fuzz_connection(inst.socket_path(service), rng, PER_CONNECTION, tables,
                                         keys, sentinel, b"sentinel-ok", max_attrs=MAX_ATTRS,
                                         max_message=MAX_MESSAGE * 4)
                check_connection(result, problems)
                tally.merge(result.tally)
                sent += result.sent
                closed += result.closed
            tallies.append(tally)
            stats.append((sent, closed))

        # warm up (tables opened, modules imported) before measuring
        run_share(1, 20, [], [], [])
        before_pids = server_processes(master_pid)
        before = usage(before_pids)
        connections = FUZZ_REQUESTS // PER_CONNECTION
        problems, tallies, stats = [], [], []
        started = time.monotonic()
        threads = [threading.Thread(target=run_share,
                                    args=(100 + t, -(-connections // THREADS), problems, tallies,
                                          stats))
                   for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        elapsed = time.monotonic() - started
        assert len(stats) == THREADS, "a fuzzing thread did not finish"
        tally = ReplyTally()
        for t in tallies:
            tally.merge(t)
        sent = sum(s for s, _ in stats)
        closed = sum(c for _, c in stats)

        # still correct with a real client, through both services
        assert inst.lookup("alice") == "alice@example.org"
        assert inst.lookup("k1", inst.write_table) == "v1"
        assert inst.lookup("fuzz-sentinel", sentinel_table) == "sentinel-ok"
        assert inst.postmap("-d", "k1", f"proxy:{lmdb_table}").returncode in (0, 1)
        after_pids = server_processes(master_pid)

        # the servers close our connections a moment after we do
        def settled():
            now = usage(after_pids)
            return now if all(now[p][0] <= before[p][0] + FD_GROWTH
                              for p in now if p in before) else None
        try:
            after = wait_for(settled, 20, what="descriptors to be released")
        except AssertionError:
            after = usage(after_pids)
        figures = {
            "requests_sent": sent, "connections": connections, "seconds": round(elapsed, 1),
            "replies_by_status": dict(tally.by_status), "closed_by_server": closed,
            "problems": problems[:20],
            "processes": {str(pid): {"cmd": " ".join(" ".join(before_pids[pid].cmdline()).split()[-4:]),
                                     "fds_before": before[pid][0],
                                     "fds_after": after.get(pid, (None, None))[0],
                                     "rss_before": before[pid][1],
                                     "rss_after": after.get(pid, (None, None))[1]}
                          for pid in before},
            "new_pids": sorted(set(after_pids) - set(before_pids)),
        }
        with open(os.path.join(root, "fuzz-figures.json"), "w") as f:
            json.dump(figures, f, indent=1)
        print("\nFIGURES master fuzz:", json.dumps(figures))
        for name, value in figures.items():
            record_property(name, json.dumps(value))

        log = inst.log()
        assert problems == []
        assert sent >= FUZZ_REQUESTS
        assert inst.procs[0].poll() is None, "the master died"
        assert set(before_pids) <= set(after_pids), "a server process disappeared"
        assert not CRASH.search(log), CRASH.search(log).group()
        assert tally.by_status["BAD"] > sent // 10 and tally.by_status["OK"] > 1000
        assert tally.by_status["DENY"] > 1000
        for pid, (fds, rss) in before.items():
            assert after[pid][0] <= fds + FD_GROWTH, (pid, fds, after[pid][0])
            assert after[pid][1] <= rss + RSS_GROWTH, (pid, rss, after[pid][1])

