"""A plugin table type for the tests: `gate:/path/to/socket`.

Installed through the `pyproxymap.tables` entry-point group by the tests
(a throwaway .dist-info on PYTHONPATH). A key starting with `slow` waits
until the test releases it: the lookup connects to the UNIX socket NAME and
blocks until one byte arrives, so tests decide exactly when a backend call
ends without any timing. `boom` raises, `none` is not found, anything else
answers at once.
"""

import socket

from proxymap.tables.backend import BackendTable


class GateTable(BackendTable):
    def lookup(self, key: bytes):
        if key.startswith(b"slow"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(120)
                s.connect(self.name)
                s.sendall(key + b"\n")
                s.recv(1)
            return b"released " + key
        if key == b"boom":
            raise ValueError("the plugin failed")
        if key == b"none":
            return None
        return b"fast " + self.fold(key)
