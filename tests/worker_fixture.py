"""Starting a standalone proxymap worker on a temporary instance, for tests.

`WorkerInstance` writes main.cf into a temp directory, starts `proxymap -n SERVICE
--listen` as a subprocess, waits (bounded) for its socket and stops it by pid.
`RawClient` speaks the protocol byte by byte so tests can send anything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from proxymap.client import read_greeting
from proxymap.conventions.service_sockets import PRIVATE, service_socket_path
from proxymap.protocol import GREETING, Decoder, encode
from proxymap.server import standalone_command
from tests.instance import POSTMAP


class WorkerInstance:
    def __init__(self, root, read_maps="", write_maps="", extra=""):
        self.root = str(root)
        self.config_dir = os.path.join(self.root, "etc")
        self.queue_dir = os.path.join(self.root, "queue")
        self.data_dir = os.path.join(self.root, "data")
        for d in (self.config_dir, os.path.join(self.queue_dir, PRIVATE), self.data_dir):
            os.makedirs(d, exist_ok=True)
        self.log_path = os.path.join(self.root, "worker.log")
        self.procs: list[subprocess.Popen] = []
        self.write_main_cf(read_maps, write_maps, extra)

    def write_main_cf(self, read_maps="", write_maps="", extra=""):
        owner = "postfix" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(f"compatibility_level = 3.6\nqueue_directory = {self.queue_dir}\n"
                    f"data_directory = {self.data_dir}\nmail_owner = {owner}\n"
                    f"maillog_file = \nproxy_read_maps = {read_maps}\n"
                    f"proxy_write_maps = {write_maps}\n{extra}\n")

    def socket_path(self, service="proxymap"):
        return service_socket_path(self.queue_dir, service)

    def start(self, service="proxymap"):
        path = self.socket_path(service)
        logf = open(self.log_path, "ab")
        proc = subprocess.Popen(standalone_command(self.config_dir, service, path),
                                stdout=logf, stderr=logf)
        logf.close()
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}: {self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(path)
                    if read_greeting(s) == GREETING:
                        return proc
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"worker did not answer on {path}: {self.log()}")

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def postmap(self, *args, input=None):
        """Run real Postfix postmap with this instance's main.cf."""
        return subprocess.run([POSTMAP, "-c", self.config_dir, *args], input=input,
                              capture_output=True, timeout=120)


class RawClient:
    """A protocol client that checks the greeting and then sends raw bytes."""

    def __init__(self, path, timeout=10):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = Decoder(max_attrs=64, max_message=1 << 24)
        self.pending: list = []
        assert self.read() == [(b"protocol", b"proxymap_protocol")]

    def send(self, data: bytes):
        self.sock.sendall(data)

    def request(self, **attrs):
        self.send(encode(list(attrs.items())))
        return dict(self.read())

    def read(self):
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def closed_by_server(self) -> bool:
        """True when the server closes the connection (within the timeout)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()
