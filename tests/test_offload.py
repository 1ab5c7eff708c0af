"""Blocking tables run off the event loop; plugins come from entry points.

The table type `gate:` (tests/plugins/gateplug.py) is installed as a plugin
through a throwaway .dist-info on PYTHONPATH. Its `slow...` keys block
until the test releases them over a UNIX socket, so each test knows for
certain that a backend call is in progress while it checks that other
clients (file tables, fast keys of the same table) are still served, that
replies keep their order, that the timeout answers RETRY, that a full lane
refuses at once, and that a plugin's exception is a RETRY and a log line.
"""

import os
import socket

import pytest

from worker_fixture import WorkerInstance, RawClient
from proxymap import dictflags as F
from proxymap.protocol import encode

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
RETRY, OK = b"2", b"0"


class Gate:
    """The test's end of the gate: accept a held lookup, release it."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sock.settimeout(30)
        self.held = []

    def wait_held(self) -> bytes:
        conn, _ = self.sock.accept()
        conn.settimeout(30)
        key = b""
        while not key.endswith(b"\n"):
            chunk = conn.recv(256)
            assert chunk, "gate client went away"
            key += chunk
        self.held.append(conn)
        return key.strip()

    def release(self):
        conn = self.held.pop(0)
        conn.sendall(b"x")
        conn.close()

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


def install_plugin(site):
    dist = site / "gateplug-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gateplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pyproxymap.tables]\ngate = gateplug:GateTable\n")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [PLUGINS, str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    inst = WorkerInstance(tmp_path / "inst")
    src = tmp_path / "inst" / "etc" / "files"
    src.write_text("file-key file value\n")
    assert inst.postmap(f"hash:{src}").returncode == 0
    gate = Gate(tmp_path / "gate")
    inst.gate_spec = f"gate:{gate.path}"
    inst.hash_spec = f"hash:{src}"

    def start(extra=""):
        inst.write_main_cf(read_maps=f"proxy:{inst.gate_spec} proxy:{inst.hash_spec}",
                           extra=extra)
        inst.start("proxymap")
        return inst
    yield start, gate
    gate.close()
    inst.stop()
    assert "Traceback" not in inst.log()


def lookup(table: str, key: bytes, flags: int = F.FOLD_FIX) -> bytes:
    return encode([(b"request", b"lookup"), (b"table", table.encode()),
                   (b"flags", str(flags).encode()), (b"key", key)])


def test_plugin_answers_real_postmap_through_the_proxy(setup):
    start, _gate = setup
    inst = start()
    r = inst.postmap("-q", "Some-Key", f"proxy:{inst.gate_spec}")
    assert (r.returncode, r.stdout) == (0, b"fast some-key\n")
    r = inst.postmap("-q", "none", f"proxy:{inst.gate_spec}")
    assert (r.returncode, r.stdout, r.stderr) == (1, b"", b"")


def test_a_slow_backend_delays_only_its_own_requests(setup):
    start, gate = setup
    inst = start()
    held = RawClient(inst.socket_path())
    # one connection pipelines a held lookup and a file-table lookup
    held.send(lookup(inst.gate_spec, b"slow-1") + lookup(inst.hash_spec, b"file-key"))
    assert gate.wait_held() == b"slow-1"
    # while it is held: other clients, file table and same table, are served
    r = inst.postmap("-q", "file-key", f"proxy:{inst.hash_spec}")
    assert (r.returncode, r.stdout) == (0, b"file value\n")
    r = inst.postmap("-q", "other", f"proxy:{inst.gate_spec}")
    assert (r.returncode, r.stdout) == (0, b"fast other\n")
    gate.release()
    # the held connection gets both replies, in request order
    first, second = dict(held.read()), dict(held.read())
    assert (first[b"status"], first[b"value"]) == (OK, b"released slow-1")
    assert (second[b"status"], second[b"value"]) == (OK, b"file value")
    held.close()


def test_timeout_answers_retry_and_the_late_answer_is_dropped(setup):
    start, gate = setup
    inst = start("proxymap_backend_timeout = 1s")
    c = RawClient(inst.socket_path(), timeout=60)
    c.send(lookup(inst.gate_spec, b"slow-late"))
    assert gate.wait_held() == b"slow-late"
    assert dict(c.read())[b"status"] == RETRY    # while the backend still holds it
    assert "no answer from the backend after 1s -- answering RETRY" in inst.log()
    gate.release()
    reply = c.request(request=b"lookup", table=inst.gate_spec.encode(),
                      flags=str(F.FOLD_FIX).encode(), key=b"next")
    assert reply[b"value"] == b"fast next"        # not the late "released" answer
    c.close()


def test_a_full_lane_answers_retry_at_once(setup):
    start, gate = setup
    inst = start("proxymap_backend_threads = 1\nproxymap_backend_queue = 1")
    a = RawClient(inst.socket_path())
    a.send(lookup(inst.gate_spec, b"slow-a"))
    assert gate.wait_held() == b"slow-a"
    b = RawClient(inst.socket_path())
    # one more may wait for the single thread; the one after is refused
    b.send(lookup(inst.gate_spec, b"slow-b") + lookup(inst.gate_spec, b"slow-c"))
    gate.release()
    assert dict(a.read())[b"value"] == b"released slow-a"
    assert gate.wait_held() == b"slow-b"
    gate.release()
    rb, rc = dict(b.read()), dict(b.read())
    assert (rb[b"status"], rb[b"value"]) == (OK, b"released slow-b")
    assert rc[b"status"] == RETRY
    assert "requests already waiting for the backend -- answering RETRY" in inst.log()
    a.close()
    b.close()


def test_a_plugin_exception_is_a_retry_and_a_log_line(setup):
    start, _gate = setup
    inst = start()
    r = inst.postmap("-q", "boom", f"proxy:{inst.gate_spec}")
    assert r.returncode == 1 and b"query error" in r.stderr
    assert f"table {inst.gate_spec}: ValueError: the plugin failed" in inst.log()
    r = inst.postmap("-q", "after", f"proxy:{inst.gate_spec}")
    assert (r.returncode, r.stdout) == (0, b"fast after\n")


def test_unknown_type_is_still_unsupported():
    from proxymap.tables import TableOpenError, table_class
    with pytest.raises(TableOpenError, match="unsupported dictionary type: nosuchtype"):
        table_class("nosuchtype")


def test_lane_tally_counts_waits_and_survives_a_retired_lane():
    """In-process: a lane of one thread, three requests held on an Event:
    one busy, two waiting (counted as waits); once released, all three
    completed, none waiting, the wait time counted. A lane replaced by a
    reopen of the same table adds to the same totals."""
    import contextlib
    import threading
    import time as clock
    from proxymap.offload import Offloader

    class Held:
        spec = "held:x"
        lane_size = 1
        timeout = 60.0

        def serving(self, flags):
            return contextlib.nullcontext()

        def close(self):
            pass

    gate = threading.Event()
    offload = Offloader(lane_queue=8)
    table = Held()
    try:
        pendings = [offload.submit(table, 0, lambda: gate.wait(30) and b"status\x000\x00",
                                   b"retry") for _ in range(3)]
        figures = offload.stats_by_table()["held:x"]
        assert (figures["threads"], figures["busy"], figures["waiting"], figures["waits"]) == \
            (1, 1, 2, 2)
        gate.set()
        done = []
        deadline = clock.monotonic() + 30
        while len(done) < 3 and clock.monotonic() < deadline:     # bounded
            done += offload.drain()
            clock.sleep(0.01)
        assert sorted(map(id, done)) == sorted(map(id, pendings))
        figures = offload.stats_by_table()["held:x"]
        assert (figures["busy"], figures["waiting"], figures["completed"]) == (0, 0, 3)
        assert figures["wait_ns"] > 0 and figures["timeouts"] == figures["rejected"] == 0
        offload.retire(table)
        again = Held()
        offload.submit(again, 0, lambda: b"status\x000\x00", b"retry")
        assert offload.stats_by_table()["held:x"]["waits"] == 2     # the same tally
    finally:
        offload.close()
