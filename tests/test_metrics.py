"""Request metrics (issue 13): counted in the worker, summed by the master,
shown by `status --json` and on the opt-in Prometheus listener.

The end-to-end tests drive real `postmap` through proxy: tables, scrape
the listener with a real HTTP client (urllib, http.client over a UNIX
socket) and parse the answer with prometheus-client's own text parser.
Counts are compared exactly with the requests made; waiting is bounded
and only for the counts to arrive (never a timed assertion).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from master import exporter
from proxymap import handoff
from proxymap import metrics
from proxymap.dispatch import Dispatcher
from proxymap.metrics import NO_TABLE, TableCounters, reply_status
from proxymap.protocol import (BAD, CONFIG, DENY, NOKEY, OK, RETRY, Decoder, encode,
                               encode_reply)
from tests.instance import POSTMAP, temporary_instance, wait_for
from tests.test_dispatch import ALLOWED, fresh, opener  # noqa: F401 (fixture)

# -- pure parts -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", [37, 311])
@pytest.mark.parametrize("name", [None, "open", "lookup", "update", "delete", "sequence"])
def test_reply_status_is_read_from_every_reply_layout(name, layout):
    for status in (OK, NOKEY, RETRY, BAD, DENY, CONFIG):
        assert reply_status(encode_reply(name, status, layout, value=b"v", key=b"k")) == status


def test_metrics_record_round_trip_and_malformed_records():
    counters = TableCounters()
    counters.requests[metrics.OPERATION_INDEX["lookup"] * metrics.STATUS_COUNT + NOKEY] = 3
    counters.latency[2] = 3
    counters.latency_ns = 500_000_000
    counters.reopens, counters.errors = 1, 2
    counters.cache_hits, counters.cache_misses = 5, 6
    spec, back = handoff.decode_metrics(handoff.encode_metrics("hash:/x", counters))
    assert spec == "hash:/x" and back.count("lookup", NOKEY) == 3
    assert (back.latency, back.latency_ns, back.reopens, back.errors, back.cache_hits,
            back.cache_misses) == (counters.latency, 500_000_000, 1, 2, 5, 6)
    for bad in (b"M", b"M[1,2]", b'M["x",[1],[2],0,0,0,0,0]', b"S" + b"x" * 24,
                handoff.encode_metrics("x", counters).replace(b",500000000,", b",0.5,"),
                b'M["x",' + json.dumps(counters.requests[:-1]).encode() + b",[],0,0,0,0,0]"):
        with pytest.raises(ValueError):
            handoff.decode_metrics(bad)


def test_sums_and_the_status_file_form():
    a, b = TableCounters(), TableCounters()
    a.requests[0] = 2          # open OK
    a.latency[0], a.latency[-1] = 1, 1
    b.requests[0] = 1
    b.latency[3] = 1
    b.reopens = 1
    total = metrics.sum_tables({"t": a}, {"t": b, "u": b})
    assert total["t"].count("open", OK) == 3 and total["u"].count("open", OK) == 1
    form = total["t"].as_json()
    assert form["requests"] == {"open": {"OK": 3}} and form["reopens"] == 1
    buckets = form["latency_seconds"]["buckets"]
    assert buckets[0] == [metrics.LATENCY_BOUNDS[0], 1]
    assert buckets[3] == [metrics.LATENCY_BOUNDS[3], 2]      # cumulative
    assert buckets[-1] == ["+Inf", 3] and form["latency_seconds"]["count"] == 3


def test_listener_text_from_a_status_file(tmp_path):
    """The collector over a status file, rendered and parsed back with
    prometheus-client: histogram buckets, the cache counters where a cache
    answered, nothing for a table without one."""
    from prometheus_client import CollectorRegistry, generate_latest
    cached, plain = TableCounters(), TableCounters()
    cached.requests[metrics.REQUEST_BASE["lookup"] + 48 + OK] = 4
    cached.latency[1], cached.latency[-1] = 3, 1
    cached.latency_ns = 2_000_000_000
    cached.cache_hits, cached.cache_misses = 3, 1
    plain.requests[metrics.REQUEST_BASE["open"] + 48 + DENY] = 1
    status = {"running": True, "reloads": 2, "generation": 2, "started": 1.0, "services": {
        "proxymap": {"workers": [{"clients": 2}], "connection_errors": 1,
                     **{"tables": {"hash:/t": cached.as_json(), NO_TABLE: plain.as_json()}}}}}
    path = tmp_path / "status"
    path.write_text(json.dumps(status))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.StatusCollector(str(path)))
    found = samples(generate_latest(registry).decode())
    assert requests_of(found, "proxymap", "hash:/t", "lookup", "OK") == 4
    assert requests_of(found, "proxymap", NO_TABLE, "open", "DENY") == 1
    assert table_sample(found, "pyproxymap_cache_hits_total", "proxymap", "hash:/t") == 3
    assert table_sample(found, "pyproxymap_cache_misses_total", "proxymap", "hash:/t") == 1
    assert not any(name.startswith("pyproxymap_cache") and ("table", NO_TABLE) in labels
                   for name, labels in found)
    buckets = {dict(labels)["le"]: value for (name, labels), value in found.items()
               if name == "pyproxymap_request_duration_seconds_bucket"}
    assert buckets["+Inf"] == 4 and min(buckets.values()) == 0
    assert table_sample(found, "pyproxymap_request_duration_seconds_sum",
                        "proxymap", "hash:/t") == 2.0
    assert found[("pyproxymap_master_reloads_total", ())] == 2
    assert found[("pyproxymap_connection_errors_total", (("service", "proxymap"),))] == 1
    assert found[("pyproxymap_clients", (("service", "proxymap"),))] == 2
    path.write_text("not json")
    assert samples(generate_latest(registry).decode()) == {("pyproxymap_up", ()): 0}


@pytest.mark.parametrize("value, parsed", [
    ("/var/run/pm.sock", ("unix", "/var/run/pm.sock")),
    ("127.0.0.1:9154", ("inet", ("127.0.0.1", 9154))),
    ("127.3.4.5:0", ("inet", ("127.3.4.5", 0))),
    ("localhost:80", ("inet", ("127.0.0.1", 80))),
    ("[::1]:9154", ("inet", ("::1", 9154))),
])
def test_listen_values(value, parsed):
    assert exporter.parse_listen(value) == parsed


@pytest.mark.parametrize("value, reason", [
    ("0.0.0.0:9154", "not a loopback address"),
    ("192.0.2.1:9154", "not a loopback address"),
    ("mx.example.com:9154", "not a loopback address"),
    ("127.0.0.1:99999", "bad port number"),
    ("127.0.0.1", "need an absolute socket path"),
    ("relative/path", "need an absolute socket path"),
    (":9154", "need an absolute socket path"),
])
def test_listen_values_refused(value, reason):
    with pytest.raises(ValueError, match=reason):
        exporter.parse_listen(value)


def request(**attrs):
    return Decoder().feed(encode(list(attrs.items())))[0]


def test_dispatcher_counts_every_answer_under_its_table(fresh):  # noqa: F811
    d = Dispatcher("proxymap", ALLOWED, {}, opener=opener)
    for key in ("foo", "foo", "nope"):
        d.handle(request(request="lookup", table="mem:a", flags="0", key=key))
    d.handle(request(request="lookup", table="broken:x", flags="0", key="k"))
    d.handle(request(request="lookup", table="crash:x", flags="0", key="k"))
    d.handle(request(request="update", table="mem:a", flags="0", key="k", value="v"))
    d.handle(request(request="lookup", table="mem:unlisted", flags="0", key="k"))
    d.handle(request(request="lookup", table="nocolon", flags="0", key="k"))
    d.handle(request(request="frobnicate", table="mem:a"))
    tables = d.metrics.tables
    assert tables["mem:a"].count("lookup", OK) == 2
    assert tables["mem:a"].count("lookup", NOKEY) == 1
    assert tables["mem:a"].count("update", DENY) == 1     # read service
    assert tables["broken:x"].count("lookup", RETRY) == 1
    assert tables["broken:x"].errors == 1                 # the failed open
    assert tables["crash:x"].count("lookup", RETRY) == 1
    assert tables["crash:x"].errors == 1                  # the unexpected exception
    # requests naming no listed table: one bounded place, not one per name
    assert tables[NO_TABLE].count("lookup", DENY) == 1
    assert tables[NO_TABLE].count("lookup", BAD) == 1
    assert tables[NO_TABLE].count("unknown", BAD) == 1
    assert set(tables) == {"mem:a", "broken:x", "crash:x", NO_TABLE}
    for counters in tables.values():
        assert sum(counters.latency) == sum(counters.requests)
    changed = d.metrics.take_changed()
    assert {spec for spec, _ in changed} == set(tables)
    assert d.metrics.take_changed() == []


# -- end to end -----------------------------------------------------------------------

def scrape_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return answer.read().decode()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX socket (what `curl --unix-socket` does)."""

    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def scrape_unix(path: str) -> str:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        assert answer.status == 200
        return answer.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} from the text format."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def requests_of(found: dict, service: str, table: str, request: str, status: str) -> float:
    key = ("pyproxymap_requests_total", tuple(sorted(
        {"service": service, "table": table, "request": request, "status": status}.items())))
    return found.get(key, 0)


def table_sample(found: dict, name: str, service: str, table: str) -> float:
    return found.get((name, (("service", service), ("table", table))), 0)


def postmap(inst, *args):
    return subprocess.run([POSTMAP, "-c", inst.config_dir, *args], capture_output=True,
                          text=True, timeout=60)


def listener_address(inst) -> str:
    listener = wait_for(lambda: (inst.raw_status().get("metrics_listener") or {}).get("pid")
                        and inst.raw_status()["metrics_listener"], what="the listener")
    return listener["address"]


def test_scrape_counts_match_the_postmap_requests_made(tmp_path):
    with temporary_instance(tmp_path, main_extra={
            "proxymap_metrics_listen": "127.0.0.1:0"}) as inst:
        inst.start()
        address = listener_address(inst)
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0     # port 0: the kernel chose
        read, write = inst.read_table, inst.write_table
        for key in ("alice", "bob", "alice", "nobody", "carol"):
            inst.lookup(key)                              # postmap -q: open + lookup
        unlisted = f"hash:{inst.table_dir}/unlisted"
        assert postmap(inst, "-q", "alice", f"proxy:{unlisted}").returncode != 0
        assert inst.delete("k1").returncode == 0          # postmap -d via proxywrite
        assert inst.delete("k1").returncode == 1          # gone now: NOKEY
        # a changed table file is reopened once
        with open(os.path.join(inst.table_dir, "read"), "w") as f:
            f.write("alice changed@example.org\n")
        subprocess.run([POSTMAP, "-c", inst.config_dir, read], check=True)
        assert inst.lookup("alice") == "changed@example.org"

        url = f"http://{address}/metrics"
        expected_read_lookups = 6

        def arrived():
            found = samples(scrape_url(url))
            done = requests_of(found, "proxymap", read, "lookup", "OK") + \
                requests_of(found, "proxymap", read, "lookup", "NOKEY")
            return found if done >= expected_read_lookups and \
                requests_of(found, "proxywrite", write, "delete", "NOKEY") >= 1 else None
        found = wait_for(arrived, what="the counts to reach the listener")
        assert requests_of(found, "proxymap", read, "open", "OK") == 6
        assert requests_of(found, "proxymap", read, "lookup", "OK") == 5
        assert requests_of(found, "proxymap", read, "lookup", "NOKEY") == 1
        assert requests_of(found, "proxymap", NO_TABLE, "open", "DENY") == 1
        assert requests_of(found, "proxywrite", write, "open", "OK") == 2
        assert requests_of(found, "proxywrite", write, "delete", "OK") == 1
        assert requests_of(found, "proxywrite", write, "delete", "NOKEY") == 1
        assert sum(v for (name, _), v in found.items()
                   if name == "pyproxymap_requests_total") == 6 + 6 + 1 + 4
        assert table_sample(found, "pyproxymap_table_reopens_total", "proxymap", read) == 1
        assert table_sample(found, "pyproxymap_table_errors_total", "proxymap", read) == 0
        assert table_sample(found, "pyproxymap_request_duration_seconds_count",
                            "proxymap", read) == 12
        inf = ("pyproxymap_request_duration_seconds_bucket",
               (("le", "+Inf"), ("service", "proxymap"), ("table", read)))
        assert found[inf] == 12
        assert found[("pyproxymap_workers", (("service", "proxywrite"),))] == 1
        assert found[("pyproxymap_up", ())] == 1

        # status --json carries the same sums
        status = inst.status()
        tables = status["services"]["proxymap"]["tables"]
        assert tables[read]["requests"] == {"open": {"OK": 6}, "lookup": {"OK": 5, "NOKEY": 1}}
        assert tables[read]["reopens"] == 1
        assert tables[NO_TABLE]["requests"] == {"open": {"DENY": 1}}
        assert status["services"]["proxymap"]["totals"]["latency_seconds"]["count"] == 13
        assert status["metrics_listener"]["address"] == address


def test_counts_of_exited_workers_are_kept(tmp_path):
    """max_use 2: a worker retires after two clients; the sums still count
    every request (the master adds the last report of each exited worker)."""
    with temporary_instance(tmp_path, main_extra={
            "proxymap_metrics_listen": "127.0.0.1:0", "max_use": "2"}) as inst:
        inst.start()
        for key in ("alice", "bob", "carol", "nobody", "alice", "bob", "carol"):
            inst.lookup(key)
        url = f"http://{listener_address(inst)}/metrics"

        def lookups():
            found = samples(scrape_url(url))
            return sum(requests_of(found, "proxymap", inst.read_table, "lookup", s)
                       for s in ("OK", "NOKEY"))
        wait_for(lambda: lookups() >= 7, what="every worker's counts")
        assert lookups() == 7
        # the worker left was handed at most max_use clients: most of the
        # counts came from workers that have exited
        wait_for(lambda: len(inst.workers("proxymap")) == 1, what="retired workers to exit")
        assert inst.workers("proxymap")[0]["handed"] <= 2


def test_unix_socket_listener_reload_and_check(tmp_path):
    with temporary_instance(tmp_path) as inst:
        path = os.path.join(inst.root, "metrics.sock")
        inst.write_main_cf(proxymap_metrics_listen=path)
        inst.start()
        assert listener_address(inst) == path
        assert inst.lookup("bob") == "bob@example.org"
        wait_for(lambda: requests_of(samples(scrape_unix(path)), "proxymap",
                                     inst.read_table, "lookup", "OK") >= 1)
        assert requests_of(samples(scrape_unix(path)), "proxymap", inst.read_table,
                           "lookup", "OK") == 1
        listener_pid = inst.raw_status()["metrics_listener"]["pid"]

        # a bad value: check and reload refuse it with file and line
        inst.write_main_cf(proxymap_metrics_listen="0.0.0.0:9154")
        result = inst.control("check")
        assert result.returncode == 1
        assert "main.cf, line " in result.stderr and "proxymap_metrics_listen" in \
            result.stderr and "not a loopback address" in result.stderr
        assert inst.control("reload").returncode == 1
        assert inst.raw_status()["metrics_listener"]["pid"] == listener_pid

        # turned off: the listener process ends, the socket no longer answers
        inst.write_main_cf(proxymap_metrics_listen="")
        assert inst.control("reload").returncode == 0
        assert inst.raw_status()["metrics_listener"] is None
        wait_for(lambda: not os.path.exists(f"/proc/{listener_pid}"), what="listener exit")
        with pytest.raises(OSError):
            scrape_unix(path)


def test_pool_figures_travel_add_up_and_leave_with_an_exited_worker(tmp_path):
    """A backend table's pool figures: through an M record, summed over two
    workers, the current state (threads, busy, waiting, connections) left
    out of an exited worker's totals while its counts stay; shown in the
    status file's form, by `status` and on the listener."""
    from prometheus_client import CollectorRegistry, generate_latest
    from master.control import format_pool
    lane = {"threads": 4, "busy": 4, "waiting": 2, "waits": 6, "wait_ns": 1_500_000_000,
            "completed": 10, "timeouts": 1, "rejected": 0}
    conns = [{"size": 4, "open": 3, "in_use": 2, "waits": 1}, {"size": 2, "open": 1,
                                                               "in_use": 1, "waits": 0}]
    one = TableCounters()
    one.pool = metrics.pool_figures(lane, conns)
    spec, back = handoff.decode_metrics(handoff.encode_metrics("pgsql:/p.cf", one))
    assert back.pool == one.pool
    assert handoff.decode_metrics(handoff.encode_metrics("hash:/x", TableCounters()))[1].pool \
        == []
    with pytest.raises(ValueError):
        handoff.decode_metrics(handoff.encode_metrics("x", one).replace(b",1500000000,", b",1.5,"))
    total = metrics.sum_tables({"t": one}, {"t": back.ended()})["t"]
    form = total.as_json()["pool"]
    assert (form["threads"], form["busy"], form["waiting"]) == (4, 4, 2)   # one live worker
    assert (form["waits"], form["completed"], form["timeouts"]) == (12, 20, 2)  # both count
    assert form["wait_seconds"] == 3.0
    assert form["connections"] == {"size": 6, "open": 4, "in_use": 3, "waits": 2}
    assert "pool" not in TableCounters().as_json()
    assert format_pool(form) == ("threads 4 busy 4 waiting 2, waits 12 (3.000s), timeouts 2"
                                 " rejected 0; connections 4 open of 6, 3 in use, waits 2")
    path = tmp_path / "status"
    path.write_text(json.dumps({"running": True, "services": {"proxymap": {
        "workers": [], "tables": {"pgsql:/p.cf": total.as_json()}}}}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.StatusCollector(str(path)))
    found = samples(generate_latest(registry).decode())
    assert table_sample(found, "pyproxymap_backend_waiting", "proxymap", "pgsql:/p.cf") == 2
    assert table_sample(found, "pyproxymap_backend_waits_total", "proxymap", "pgsql:/p.cf") == 12
    assert table_sample(found, "pyproxymap_backend_wait_seconds_total", "proxymap",
                        "pgsql:/p.cf") == 3.0
    assert table_sample(found, "pyproxymap_backend_connections_open", "proxymap",
                        "pgsql:/p.cf") == 4


def test_a_service_without_a_worker_is_shown_as_such(tmp_path):
    """proxywrite started on demand and not started yet: `status` says 0
    workers and that the first client starts one, the listener exports a
    workers gauge of 0 (not a missing series)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from master.control import format_status
    status = {"running": True, "pid": 1, "uptime": 5, "generation": 0, "services": {
        "proxymap": {"path": "/q/private/proxymap", "maxproc": 100, "min_workers": 1,
                     "workers": [{"pid": 7, "generation": 0, "state": "ready", "clients": 0,
                                  "requests": 3}]},
        "proxywrite": {"path": "/q/private/proxywrite", "maxproc": 1, "min_workers": 0,
                       "workers": []}}}
    lines = format_status(status).splitlines()
    assert "service proxywrite (/q/private/proxywrite): 0 worker(s), maxproc 1, the first " \
           "client starts one" in lines
    assert "service proxymap (/q/private/proxymap): 1 worker(s), maxproc 100" in lines
    path = tmp_path / "status"
    path.write_text(json.dumps(status))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.StatusCollector(str(path)))
    found = samples(generate_latest(registry).decode())
    assert found[("pyproxymap_workers", (("service", "proxywrite"),))] == 0
    assert found[("pyproxymap_workers", (("service", "proxymap"),))] == 1
