"""The answer cache never serves a stale answer: real Postfix `postmap`
rebuilds a table in a loop while several clients look keys up through one
worker, and every answer is checked against the table versions that were
current at some moment between the request's sending and its reply.

Ordering comes from one logical clock (a shared counter) that each event
takes a number from: a rebuild takes one before `postmap` starts and one
after it has exited, a request one before it is sent and one after its
reply arrived. Version v (the content the v-th rebuild writes) is current
from some moment inside its rebuild until some moment inside rebuild v+1,
so an answer is acceptable when it is the content of a version v whose
rebuild started before the reply arrived and whose successor's rebuild had
not ended before the request was sent.
"""

from __future__ import annotations

import itertools
import os
import threading

import pytest

from worker_fixture import RawClient, WorkerInstance

KEYS = [f"k{n}" for n in range(4)]
REBUILDS = 30
CLIENTS = 6


def source_text(version: int) -> str:
    lines = [f"{key} v{version}" for key in KEYS]
    if version % 2:
        lines.append(f"odd v{version}")    # present in odd versions only
    return "\n".join(lines) + "\n"


def acceptable(versions, send, recv):
    """Versions current at some moment in [send, recv]: versions[v] is
    (start, end) of the rebuild that wrote version v (version 0: before the
    test)."""
    out = []
    for v, (start, _end) in enumerate(versions):
        successor_done = v + 1 < len(versions) and versions[v + 1][1] < send
        if start < recv and not successor_done:
            out.append(v)
    return out


def test_acceptable_versions():
    versions = [(-1, -1), (10, 20), (30, 40)]
    assert acceptable(versions, 5, 8) == [0]
    assert acceptable(versions, 21, 25) == [1]        # rebuild 1 had ended: not 0
    assert acceptable(versions, 41, 50) == [2]
    assert acceptable(versions, 15, 35) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["hash", "btree"])
def test_no_stale_answer_while_postmap_rebuilds(tmp_path, kind):
    inst = WorkerInstance(tmp_path)
    src = os.path.join(inst.config_dir, "map")
    with open(src, "w") as f:
        f.write(source_text(0))
    assert inst.postmap(f"{kind}:{src}").returncode == 0
    table = f"{kind}:{src}"
    inst.write_main_cf(read_maps=f"proxy:{table}")
    inst.start("proxymap")
    clock = itertools.count()
    versions = [(-1, -1)]
    done = threading.Event()
    answers: list[tuple[str, int, bytes | None, int, int]] = []
    errors: list[BaseException] = []

    def rebuild():
        try:
            for version in range(1, REBUILDS + 1):
                with open(src + ".tmp", "w") as f:
                    f.write(source_text(version))
                os.rename(src + ".tmp", src)
                start = next(clock)
                result = inst.postmap(f"{kind}:{src}")
                end = next(clock)
                assert result.returncode == 0, result.stderr
                versions.append((start, end))
        except BaseException as exc:       # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    def look_up(number):
        try:
            client = RawClient(inst.socket_path())
            keys = itertools.cycle([*KEYS[: 1 + number % len(KEYS)], "odd"])
            while not done.is_set():
                key = next(keys)
                send = next(clock)
                reply = client.request(request="lookup", table=table, flags=64, key=key)
                recv = next(clock)
                answers.append((key, int(reply[b"status"]), reply.get(b"value"), send, recv))
            client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=look_up, args=(n,)) for n in range(CLIENTS)]
    writer = threading.Thread(target=rebuild)
    try:
        for t in threads:
            t.start()
        writer.start()
        writer.join(600)
        done.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert not writer.is_alive() and not any(t.is_alive() for t in threads)
        stale = []
        found = nokey = retry = 0
        for key, status, value, send, recv in answers:
            ok_versions = acceptable(versions, send, recv)
            if status == 0:
                found += 1
                good = {f"v{v}".encode() for v in ok_versions if key != "odd" or v % 2}
                if value not in good:
                    stale.append((key, value, ok_versions))
            elif status == 1:
                nokey += 1
                if key != "odd" or not any(v % 2 == 0 for v in ok_versions):
                    stale.append((key, "NOKEY", ok_versions))
            else:
                retry += 1       # a lock wait that ran out: no answer, not a wrong one
        assert not stale, stale[:10]
        assert found > REBUILDS and nokey > 0
        # and the last version is what everybody gets now
        client = RawClient(inst.socket_path())
        reply = client.request(request="lookup", table=table, flags=64, key="k0")
        assert reply[b"value"] == f"v{REBUILDS}".encode()
        client.close()
    finally:
        done.set()
        inst.stop()
    log = inst.log()
    # the cache did answer (it is what this test is about)
    hits = [line for line in log.splitlines() if "answer cache:" in line]
    assert hits, log[-2000:]
    assert int(hits[-1].split("answer cache: ")[1].split()[0]) > 0, hits[-1]
