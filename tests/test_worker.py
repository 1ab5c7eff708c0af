"""The worker over real sockets: greeting, pipelining, malformed input.

Each malformed-input case also checks that a second client of the same
worker is answered while the bad one is being dealt with.
"""

import pytest

from worker_fixture import WorkerInstance, RawClient

TABLE = "inline:{alpha=one, beta=two}"


@pytest.fixture
def inst(tmp_path):
    i = WorkerInstance(tmp_path, read_maps=f"proxy:{TABLE} proxy:static:{{hello world}}",
                 extra="ipc_timeout = 2s\nproxymap_max_request_size = 4096\n"
                       "proxymap_max_attributes = 16")
    i.start()
    yield i
    i.stop()


def lookup(client, key, table=TABLE):
    return client.request(request="lookup", table=table, flags=0, key=key)


def assert_served(inst):
    """A fresh client gets a correct answer."""
    other = RawClient(inst.socket_path())
    try:
        assert lookup(other, "alpha") == {b"status": b"0", b"value": b"one"}
    finally:
        other.close()


def test_lookup_and_static(inst):
    c = RawClient(inst.socket_path())
    assert lookup(c, "beta") == {b"status": b"0", b"value": b"two"}
    assert lookup(c, "gamma") == {b"status": b"1", b"value": b""}
    assert lookup(c, "x", "static:{hello world}") == {b"status": b"0", b"value": b"hello world"}


def test_pipelined_requests_are_answered_in_order(inst):
    c = RawClient(inst.socket_path())
    from proxymap.protocol import encode
    burst = b"".join(encode([("request", "lookup"), ("table", TABLE), ("flags", 0), ("key", k)])
                     for k in ("alpha", "nope", "beta") * 50)
    c.send(burst)
    got = [dict(c.read()) for _ in range(150)]
    assert [g[b"value"] for g in got[:3]] == [b"one", b"", b"two"]
    assert all(g == got[i % 3] for i, g in enumerate(got))


@pytest.mark.parametrize("raw, expect", [
    (b"garbage\0x\0\0", b"status\x003\0\0"),
    (b"request\0lookup\0table\0" + TABLE.encode() + b"\0flags\x000\0\0", b"status\x003\0value\0\0\0"),
    (b"request\0lookup\0table\0" + TABLE.encode() + b"\0flags\x000\0key\0alpha\0more\0x\0\0",
     b"status\x003\0value\0\0\0"),
    (b"request\0frobnicate\0table\0x:y\0\0", b"status\x003\0\0"),
    (b"request\0lookup\0table\0nocolon\0flags\x000\0key\0k\0\0", b"status\x003\0value\0\0\0"),
    (b"request\0lookup\0table\0hash:/not/listed\0flags\x000\0key\0k\0\0", b"status\x004\0value\0\0\0"),
    (b"request\0update\0table\0" + TABLE.encode() + b"\0flags\x000\0key\0k\0value\0v\0\0",
     b"status\x004\0\0"),
])
def test_bad_requests_get_a_status_and_the_connection_goes_on(inst, raw, expect):
    c = RawClient(inst.socket_path())
    c.send(raw)
    from proxymap.protocol import encode
    assert encode(c.read()) == expect
    assert_served(inst)
    assert lookup(c, "alpha")[b"value"] == b"one"   # same connection still in sync


def test_huge_value_closes_the_connection_with_a_log_line(inst):
    c = RawClient(inst.socket_path())
    try:
        c.send(b"request\0lookup\0table\0" + TABLE.encode() + b"\0flags\x000\0key\0" + b"k" * 10000)
    except BrokenPipeError:
        pass
    assert c.closed_by_server()
    assert "request larger than 4096 bytes" in inst.log()
    import os
    assert f"from client pid {os.getpid()} uid {os.getuid()}" in inst.log()
    assert_served(inst)


def test_too_many_attributes_closes_the_connection(inst):
    c = RawClient(inst.socket_path())
    c.send(b"request\0lookup\0" + b"a\0b\0" * 40)
    assert c.closed_by_server()
    assert "more than 16 attributes" in inst.log()
    assert_served(inst)


def test_eof_mid_request_is_logged(inst):
    c = RawClient(inst.socket_path())
    c.send(b"request\0lookup\0table\0inl")
    c.close()
    assert_served(inst)
    import time
    deadline = time.monotonic() + 10
    while "premature end-of-input" not in inst.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "premature end-of-input" in inst.log()


def test_client_that_never_finishes_is_dropped_after_ipc_timeout(inst):
    c = RawClient(inst.socket_path())
    c.send(b"request\0lookup\0table\0inl")
    assert_served(inst)                      # the worker is not stuck meanwhile
    assert c.closed_by_server()              # within the 10 s socket timeout
    assert "request unfinished" in inst.log()


def test_client_that_never_reads_does_not_stall_others(inst):
    c = RawClient(inst.socket_path())
    from proxymap.protocol import encode
    one = encode([("request", "lookup"), ("table", TABLE), ("flags", 0), ("key", "alpha")])
    c.sock.setblocking(False)
    sent, blocked_since = 0, None
    import time
    deadline = time.monotonic() + 20
    # Send until the server stops reading from us: our replies fill the
    # socket, the server holds the rest and, by back-pressure, reads no more.
    while time.monotonic() < deadline:
        try:
            sent += c.sock.send(one)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 0.5:
                break
            time.sleep(0.01)
    assert sent > 0
    assert_served(inst)
    deadline = time.monotonic() + 15
    while "reply unread" not in inst.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reply unread" in inst.log()
    # The server has closed the connection: the client sees EOF (or a reset,
    # since its unread requests were discarded).
    c.sock.settimeout(10)
    try:
        while c.sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass


def test_control_characters_cannot_forge_log_lines(inst):
    c = RawClient(inst.socket_path())
    forged = "hash:/x\npostfix/proxymap[1]: fatal: forged"
    assert lookup(c, "k", forged)[b"status"] == b"4"
    assert_served(inst)
    log = inst.log()
    assert "fatal: forged" in log                     # the text is there...
    assert not any(line.startswith("postfix/proxymap[1]:") for line in log.splitlines())
    assert "hash:/x\\x0apostfix/proxymap[1]" in log   # ...on the line it belongs to
