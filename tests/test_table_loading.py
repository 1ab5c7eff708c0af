"""Which table modules a process loads: only the types its configuration names.

The remote tables' client libraries (ldap3, redis, psycopg, pymysql,
pymemcache) are most of a worker's memory; proxymap/tables/__init__.py
imports a type's module only when a table of that type is named, and the
master (master/supervisor.py, preload_worker) imports what its services'
allow-lists name before it forks workers, at start and again at reload.

The interop tests run our real master with a `sitecustomize` on its
PYTHONPATH that records, for every process of the service (the master and
its forked workers, which inherit the hook), each module imported for the
first time, and each fork; nothing here depends on timing or on memory
sizes. A reload that adds a redis: table makes it work (real redis-server,
real `postmap -q`), and its module is then loaded by the master, before the
new workers are forked; so is a plugin type, found through its entry point
(tests/plugins/gateplug.py, as in tests/test_offload.py).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.instance import needs_postmap, temporary_instance, wait_for

#: modules of the remote tables' clients, and of what only the master's
#: control commands or the metrics listener need
REMOTE_CLIENTS = ("ldap3", "redis", "psycopg", "psycopg_pool", "pymysql", "pymemcache",
                  "pyasn1", "prometheus_client", "psutil", "daemon")

RECORDER = textwrap.dedent('''\
    """Test hook (tests/test_table_loading.py): record first imports, forks
    and subprocesses."""
    import os
    import sys

    _LOG = os.environ.get("PM_IMPORT_LOG", "")

    def _note(text):
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, f"{os.getpid()} {text}\\n".encode())
        finally:
            os.close(fd)

    class _Recorder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in sys.modules:
                _note(name)
            return None

    def _audit(event, args):
        if event == "subprocess.Popen":
            _note(f"<exec {args[0]}>")

    if _LOG:
        sys.meta_path.insert(0, _Recorder)
        os.register_at_fork(after_in_child=lambda: _note("<forked>"))
        sys.addaudithook(_audit)
''')


def top_level(name: str) -> str:
    return name.partition(".")[0]


def read_imports(path: str) -> dict[int, set[str]]:
    """pid -> the modules (and "<forked>") that process recorded."""
    found: dict[int, set[str]] = {}
    with open(path) as f:
        for line in f:
            pid, _, name = line.strip().partition(" ")
            found.setdefault(int(pid), set()).add(name)
    return found


def remote_modules(names) -> set[str]:
    return {name for name in names if top_level(name) in REMOTE_CLIENTS}


def fresh_python(code: str) -> str:
    """Run `code` in a new interpreter (this one has every module loaded)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- the registry -------------------------------------------------------------------

def test_preload_imports_only_the_named_types_and_their_members():
    out = fresh_python(textwrap.dedent(f'''\
        import sys
        from proxymap.tables import preload
        print(sorted(preload(["hash:/etc/aliases", "unionmap:{{cidr:/a, proxy:inline:{{a=b}}}}"])))
        print(sorted(m for m in sys.modules if m.partition(".")[0] in {REMOTE_CLIENTS!r}))
        print("importlib.metadata" in sys.modules)
        print(sorted(preload(["nosuchtype:/x"])), "importlib.metadata" in sys.modules)
    '''))
    # entry points (importlib.metadata) are read only for a type not built in
    assert out.splitlines() == ["['cidr', 'hash', 'inline', 'unionmap']", "[]", "False",
                                "[] True"]


def test_a_type_first_named_later_is_imported_on_open():
    out = fresh_python(textwrap.dedent('''\
        import sys
        from proxymap.tables import open_table, preload
        preload(["hash:/etc/aliases"])
        print("proxymap.tables.ldap" in sys.modules)
        table = open_table("inline:{a=b}", 0, False, {})
        print(table.lookup(b"a"))
        print(sorted(preload(["ldap:/nonexistent.cf"])), "ldap3" in sys.modules)
    '''))
    assert out.splitlines() == ["False", "b'b'", "['ldap'] True"]


def test_unknown_types_keep_their_messages():
    from master.checks import table_problem
    from proxymap.tables import TableOpenError, open_table
    assert table_problem("mongodb:/etc/x.cf", None) == "unsupported dictionary type: mongodb"
    with pytest.raises(TableOpenError, match="^unsupported dictionary type: mongodb$"):
        open_table("mongodb:/etc/x.cf", 0, False, {})


# -- our master and its workers -----------------------------------------------------

def start_recorded(inst, hook_dir: str, log: str, path: list[str] = ()):
    os.makedirs(hook_dir, exist_ok=True)
    with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
        f.write(RECORDER)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o666)
    os.close(fd)
    os.chmod(log, 0o666)        # workers append to it as mail_owner
    return inst.run_foreground(env={"PYTHONPATH": os.pathsep.join([hook_dir, *path]),
                                    "PM_IMPORT_LOG": log})


def worker_pids(inst) -> set[int]:
    return {w["pid"] for service in ("proxymap", "proxywrite") for w in inst.workers(service)}


@needs_postmap
def test_hash_only_workers_load_no_remote_client(tmp_path):
    with temporary_instance(tmp_path) as inst:
        log = os.path.join(inst.root, "imports.log")
        start_recorded(inst, os.path.join(inst.root, "hook"), log)
        assert inst.lookup("alice") == "alice@example.org"
        assert inst.lookup("k1", inst.write_table) == "v1"
        pids = worker_pids(inst)
        master = inst.master_pid()
        inst.stop()
        imports = read_imports(log)
        assert pids and all("<forked>" in imports.get(pid, ()) for pid in pids), imports.keys()
        # the master loaded the configured types before forking
        assert {"proxymap.tables.berkeleydb", "proxymap.server"} <= imports[master]
        for pid, names in imports.items():
            assert not remote_modules(names), (pid, remote_modules(names))
            assert "importlib.metadata" not in names, pid
            assert "proxymap.tables.lmdb" not in names, pid
        # the master found libc for inotify (ldconfig -p) once, for every worker
        assert any(name.startswith("<exec") for name in imports[master])
        for pid in pids:
            assert not [n for n in imports[pid] if n.startswith("<exec")], pid


@needs_postmap
@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (apt-get install redis-server)")
def test_reload_adding_a_redis_table_makes_it_work(tmp_path):
    pytest.importorskip("redis")
    from servers import RedisServer
    server = RedisServer()
    try:
        with temporary_instance(tmp_path) as inst:
            log = os.path.join(inst.root, "imports.log")
            start_recorded(inst, os.path.join(inst.root, "hook"), log)
            assert inst.lookup("alice") == "alice@example.org"
            master = inst.master_pid()
            assert not any(remote_modules(n) for n in read_imports(log).values())

            cf = os.path.join(inst.config_dir, "redis.cf")
            with open(cf, "w") as f:
                f.write(f"hosts = unix:{server.socket}\nkey_format = loading:%s\n")
            os.chmod(cf, 0o644)
            server._ask(b"SET loading:dave dave@example.org\r\n", b"\r\n")
            settings = inst.main_settings()
            inst.write_main_cf(proxy_read_maps=f"{settings['proxy_read_maps']} proxy:redis:{cf}")
            assert inst.control("reload").returncode == 0

            def found():
                done = inst.postmap("-q", "dave", f"proxy:redis:{cf}")
                return done.returncode == 0 and done.stdout.strip() == "dave@example.org"
            wait_for(found, 30, what="the redis: table after the reload")
            assert inst.lookup("alice") == "alice@example.org"
            inst.stop()
            imports = read_imports(log)
            # loaded once, by the master, before it forked the new workers
            assert [pid for pid, names in imports.items() if "redis" in names] == [master]
            assert "proxymap.tables.redis" in imports[master]
    finally:
        server.cleanup()


@needs_postmap
def test_a_plugin_type_is_loaded_by_the_master_from_its_entry_point(tmp_path):
    from tests.test_offload import PLUGINS, install_plugin
    with temporary_instance(tmp_path) as inst:
        site = os.path.join(inst.root, "site")
        install_plugin(pathlib.Path(site))
        hook = os.path.join(inst.root, "hook")
        log = os.path.join(inst.root, "imports.log")
        inst.write_main_cf(proxy_read_maps=f"{inst.main_settings()['proxy_read_maps']} "
                                           f"proxy:gate:/nonexistent")
        start_recorded(inst, hook, log, [PLUGINS, site])
        done = inst.postmap("-q", "alice", "proxy:gate:/nonexistent")
        assert (done.returncode, done.stdout.strip()) == (0, "fast alice"), done.stderr
        master = inst.master_pid()
        inst.stop()
        imports = read_imports(log)
        assert {"gateplug", "importlib.metadata"} <= imports[master]
        assert [pid for pid, names in imports.items() if "gateplug" in names] == [master]
