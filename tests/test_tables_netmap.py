"""socketmap: and tcp: through our proxy against Postfix's own clients.

The test runs a small socketmap server (UNIX socket) and a tcp_table
server (loopback, a port the kernel picks) in threads of its own; real
`postmap -q` (Postfix 3.7) queries each directly and through our worker
(`proxy:socketmap:...`, `proxy:tcp:...`): same output, same exit codes,
for found, not found, temporary and permanent errors, quoting, folding
and a server that drops the connection.
"""

import socketserver
import threading

import pytest

from sqldata import assert_same_answers, both
from worker_fixture import WorkerInstance
from proxymap.tables.socketmap import netstring
from proxymap.tables.tcp import hex_quote, hex_unquote

DATA = {b"alice@example.com": b"alice value", b"with space": b"spaced value %",
        b"mixed": b"v\xc3\xa9"}
KEYS = ["alice@example.com", "ALICE@Example.com", "with space", "mixed", "missing",
        "temp", "perm", "drop", "100%"]


class SocketmapHandler(socketserver.StreamRequestHandler):
    def handle(self):
        served = 0
        while True:
            head = b""
            while not head.endswith(b":"):
                c = self.rfile.read(1)
                if not c:
                    return
                head += c
            body = self.rfile.read(int(head[:-1]) + 1)[:-1]
            name, _, key = body.partition(b" ")
            served += 1
            if key == b"drop" and served == 1:
                return           # close without a reply: the client reconnects once
            if key == b"temp":
                reply = b"TEMP database busy"
            elif key == b"perm":
                reply = b"PERM no such map"
            elif name != b"mymap":
                reply = b"PERM unknown map"
            elif key in DATA:
                reply = b"OK " + DATA[key]
            else:
                reply = b"NOTFOUND "
            self.wfile.write(netstring(reply))
            self.wfile.flush()


class TcpHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            key = hex_unquote(line.rstrip(b"\n")[4:])
            if key == b"temp":
                reply = b"400 busy"
            elif key == b"perm":
                reply = b"XYZ malformed"
            elif key in DATA:
                reply = b"200 " + hex_quote(DATA[key])
            else:
                reply = b"500 not found"
            self.wfile.write(reply + b"\n")
            self.wfile.flush()


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    root = tmp_path_factory.mktemp("netmap")
    servers = [UnixServer(str(root / "sockmap"), SocketmapHandler),
               TcpServer(("127.0.0.1", 0), TcpHandler)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    i = WorkerInstance(root / "inst")
    i.specs = {"socketmap": f"socketmap:unix:{root}/sockmap:mymap",
               "othermap": f"socketmap:unix:{root}/sockmap:othermap",
               "tcp": f"tcp:127.0.0.1:{servers[1].server_address[1]}"}
    i.write_main_cf(read_maps=" ".join(f"proxy:{s}" for s in i.specs.values()))
    i.start("proxymap")
    yield i
    i.stop()
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize("table", ["socketmap", "othermap", "tcp"])
def test_answers_like_postfix(inst, table):
    assert_same_answers(inst, inst.specs[table], KEYS, expect_found=table != "othermap")


def test_known_answers_and_log_lines(inst):
    _, p = both(inst, "with space", inst.specs["tcp"])
    assert p.stdout == b"spaced value %\n"
    _, p = both(inst, "alice@example.com", inst.specs["socketmap"])
    assert p.stdout == b"alice value\n"
    _, p = both(inst, "ALICE@Example.com", inst.specs["socketmap"])
    assert p.returncode == 1    # postmap folds with FOLD_FIX, a pattern table with FOLD_MUL
    d, p = both(inst, "temp", inst.specs["socketmap"])
    assert p.returncode == d.returncode == 1 and b"query error" in p.stderr
    log = inst.log()
    assert "socketmap server temporary error: database busy" in log
    assert "socketmap server permanent error: no such map" in log
    assert "Traceback" not in log
