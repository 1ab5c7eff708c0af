"""The opt-in Prometheus listener (main.cf `proxymap_metrics_listen`).

Postfix has nothing of the kind; this is ours. Off by default. Set to an
absolute path (a UNIX socket, mode 0666: the directory guards access) or to
a loopback `host:port` (`127.0.0.1:9154`, `[::1]:9154`, `localhost:9154`;
port 0: the kernel picks one, `status` shows which), the master binds it
and forks one small process that answers HTTP GET with the Prometheus text
format (prometheus-client's WSGI app on the standard library's server).

That process reads the master's status file on every scrape: the counters
there are the sums the master made of its workers' reports
(proxymap/metrics.py, proxymap/handoff.py), so a scrape never waits on the
master's loop or on a worker. It runs as mail_owner when the master runs as
root, and exits when the master has gone. The master restarts it if it
dies, after service_throttle_time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat

#: the process title of the listener process
TITLE = "proxymap-master metrics listener"

#: a backend table's pool figures exported as gauges (the status file's
#: "pool" names; connections_* from its "connections")
POOL_GAUGE_HELP = {
    "threads": "lane threads of a table served off the event loop",
    "busy": "lane threads working on a request now",
    "waiting": "requests waiting for a lane thread now",
    "connections_size": "bound of the table's connection pools",
    "connections_open": "connections the table's pools hold open",
    "connections_in_use": "connections in use now",
}
#: ... and as counters
POOL_COUNTER_HELP = {
    "waits": "requests that found every lane thread busy",
    "wait_seconds": "time those requests waited for a thread",
    "timeouts": "requests answered RETRY after proxymap_backend_timeout",
    "rejected": "requests answered RETRY at once: the lane's queue was full",
    "connections_waits": "requests that waited for a pooled connection",
}


def parse_listen(value: str) -> tuple[str, object]:
    """("unix", PATH) or ("inet", (HOST, PORT)) for a proxymap_metrics_listen
    value; ValueError with the reason for anything else, a host that is
    not a loopback address included (the counters are for this machine's
    scraper, not for the network)."""
    value = value.strip()
    if value.startswith("/"):
        return "unix", value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"need an absolute socket path or a loopback host:port, "
                         f"not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not a loopback address") from None
    if not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address")
    number = int(port)
    if number > 65535:
        raise ValueError(f"bad port number: {port}")
    return "inet", (str(address), number)


def bind(listen: tuple[str, object], owner_uid: int = -1, owner_gid: int = -1) -> socket.socket:
    """A listening socket for parse_listen()'s result. A UNIX socket file
    left by an earlier run is replaced; any other file there is not.
    OSError with the path or address in its text."""
    kind, where = listen
    if kind == "unix":
        path = where
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o666)
            if owner_uid >= 0:
                os.chown(path, owner_uid, owner_gid)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"bind {path}: {exc.strerror}") from None
    else:
        host, port = where
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"bind {host}:{port}: {exc.strerror}") from None
    sock.listen(16)
    return sock


def address_of(sock: socket.socket) -> str:
    """How status and the log name the listener: the path, or host:port
    with the port actually bound."""
    name = sock.getsockname()
    if isinstance(name, str):
        return name
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the listener process --------------------------------------------------------------

class StatusCollector:
    """A prometheus-client collector over the master's status file."""

    def __init__(self, status_file: str):
        self.status_file = status_file

    def read(self) -> dict:
        try:
            with open(self.status_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.utils import floatToGoString
        status = self.read()
        up = GaugeMetricFamily("pyproxymap_up", "1 while the master's status file is readable")
        up.add_metric([], 1 if status.get("running") else 0)
        yield up
        if not status:
            return
        reloads = CounterMetricFamily("pyproxymap_master_reloads",
                                      "reloads (SIGHUP) since the master started")
        reloads.add_metric([], status.get("reloads", 0))
        generation = GaugeMetricFamily("pyproxymap_master_generation",
                                       "configuration generation")
        generation.add_metric([], status.get("generation", 0))
        started = GaugeMetricFamily("pyproxymap_master_start_time_seconds",
                                    "start time of the master, seconds since the epoch")
        started.add_metric([], status.get("started", 0))
        table_labels = ["service", "table"]
        requests = CounterMetricFamily("pyproxymap_requests", "requests answered, by table, "
                                       "request type and status",
                                       labels=[*table_labels, "request", "status"])
        reopens = CounterMetricFamily("pyproxymap_table_reopens",
                                      "tables reopened after their file changed",
                                      labels=table_labels)
        errors = CounterMetricFamily("pyproxymap_table_errors", "table opens that failed and "
                                     "internal errors", labels=table_labels)
        latency = HistogramMetricFamily("pyproxymap_request_duration_seconds",
                                        "time from the worker's wake-up to read a request "
                                        "to its reply", labels=table_labels)
        conn_errors = CounterMetricFamily("pyproxymap_connection_errors",
                                          "client connections closed on an error",
                                          labels=["service"])
        workers = GaugeMetricFamily("pyproxymap_workers", "worker processes",
                                    labels=["service"])
        clients = GaugeMetricFamily("pyproxymap_clients", "client connections open",
                                    labels=["service"])
        cache_hits = CounterMetricFamily("pyproxymap_cache_hits", "answers from the "
                                         "answer cache", labels=table_labels)
        cache_misses = CounterMetricFamily("pyproxymap_cache_misses", "lookups the answer "
                                           "cache could not answer", labels=table_labels)
        # tables served off the loop: their lanes and connection pools
        # (the "pool" of TableCounters.as_json), summed over the workers
        pool_gauges = {name: GaugeMetricFamily(f"pyproxymap_backend_{name}", text,
                                               labels=table_labels)
                       for name, text in POOL_GAUGE_HELP.items()}
        pool_counters = {name: CounterMetricFamily(f"pyproxymap_backend_{name}", text,
                                                   labels=table_labels)
                         for name, text in POOL_COUNTER_HELP.items()}
        for service_name, service in sorted(status.get("services", {}).items()):
            live = service.get("workers", [])
            workers.add_metric([service_name], len(live))
            clients.add_metric([service_name], sum(w.get("clients", 0) for w in live))
            conn_errors.add_metric([service_name], service.get("connection_errors", 0))
            for table, counted in sorted(service.get("tables", {}).items()):
                labels = [service_name, table]
                for request, by_status in sorted(counted.get("requests", {}).items()):
                    for status_name, n in sorted(by_status.items()):
                        requests.add_metric([*labels, request, status_name], n)
                if table == "-":        # requests naming no table of the allow-list
                    continue
                reopens.add_metric(labels, counted.get("reopens", 0))
                errors.add_metric(labels, counted.get("errors", 0))
                histogram = counted.get("latency_seconds", {})
                latency.add_metric(labels, [(b if b == "+Inf" else floatToGoString(b), n)
                                            for b, n in histogram.get("buckets", [])],
                                   histogram.get("sum", 0.0))
                # an answer cache's counters (TableCounters.cache_hits and
                # cache_misses), present once a cache has answered
                cache = counted.get("cache")
                if cache:
                    cache_hits.add_metric(labels, cache.get("hits", 0))
                    cache_misses.add_metric(labels, cache.get("misses", 0))
                pool = counted.get("pool")
                if pool:
                    figures = {**pool, **{f"connections_{k}": v
                                          for k, v in pool.get("connections", {}).items()}}
                    for name, family in (*pool_gauges.items(), *pool_counters.items()):
                        family.add_metric(labels, figures.get(name, 0))
        yield from (reloads, generation, started, requests, reopens, errors, latency,
                    conn_errors, workers, clients, cache_hits, cache_misses,
                    *pool_gauges.values(), *pool_counters.values())


def preload() -> None:
    """Import what serve() needs while the interpreter's files are still
    readable (before the switch to mail_owner)."""
    import socketserver  # noqa: F401
    import wsgiref.simple_server  # noqa: F401

    import prometheus_client  # noqa: F401
    import prometheus_client.core  # noqa: F401
    import prometheus_client.utils  # noqa: F401


def serve(sock: socket.socket, status_file: str, master_pid: int) -> None:
    """Answer scrapes on `sock` until the master (our parent) has gone."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status_file))

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):       # no line per scrape
            pass

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

        def get_request(self):
            conn, peer = self.socket.accept()
            return conn, peer if isinstance(peer, tuple) else ("local", 0)

        def service_actions(self):
            if os.getppid() != master_pid:
                raise SystemExit(0)

    server = Server(("localhost", 0), QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    name = sock.getsockname()
    server.server_name = "localhost"
    server.server_port = name[1] if isinstance(name, tuple) else 0
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    server.serve_forever(poll_interval=0.5)
