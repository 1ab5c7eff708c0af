"""`proxymap-master -c DIR COMMAND`: start, stop, reload and inspect the master.

This is our counterpart of Postfix's postfix(1) command and postfix-script
for the proxymap services: `start` detaches a master and returns only when
every service greets its clients (like `master -w`, but checked from the
outside too; a service started on demand only has its socket checked: a
greeting would start its worker), `stop` and `reload` signal the process named in the locked
pid file, `status` shows the workers, `run` stays in the foreground (for
systemd), `check` validates main.cf and master.cf, and `config` is a small
postconf(1).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import stat
import sys
import time

from master import pidfile
from master.supervisor import (PROGRAM, Master, load_configuration, not_served,
                               service_settings, socket_state, status_path)
from proxymap import add_version_option
from proxymap.conventions import maillog
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.main_cf import default_config_dir, load_main_cf
from proxymap.conventions.parameters import PROXY_READ_MAPS_DEFAULT, PROXY_READ_MAPS_DEFAULT_311
from proxymap.client import check_greeting
from proxymap.util.output import emit

#: seconds `start` waits for the daemon to report its workers ready
START_TIMEOUT = 30.0
#: seconds `stop` waits for the master to exit before SIGKILL
STOP_TIMEOUT = 15.0
#: seconds `reload` waits for the master to acknowledge
RELOAD_TIMEOUT = 10.0


class Failure(Exception):
    """A one-line reason for a non-zero exit."""


def fatal(text: str) -> int:
    print(f"{PROGRAM}: fatal: {text}", file=sys.stderr)
    return 1


# -- helpers ------------------------------------------------------------------------

def load(args, workers: bool = False):
    try:
        return load_configuration(args.config_dir, workers=workers,
                                  services_from=args.services_from)
    except ConfigError as exc:
        raise Failure(str(exc)) from None


def master_pid(config) -> int | None:
    return pidfile.running_pid(pidfile.pid_path(config.main.get("queue_directory")))


def read_status(queue_directory: str) -> dict | None:
    try:
        with open(status_path(queue_directory)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    """Poll `condition` until true or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


# -- commands -----------------------------------------------------------------------

def cmd_check(args) -> int:
    config = load(args, workers=True)
    for service in config.skipped:
        maillog.warning(f"{not_served(service)} -- it will be skipped")
    if not config.services:
        raise Failure(f"{config.service_file}: no proxymap service")
    taken = taken_over_sockets(collect_status(args.config_dir))
    for path in taken:
        maillog.error(f"socket file {path} is no longer ours: another process replaced or "
                      f"removed it -- run `{PROGRAM} reload` to bind it again")
    from master.checks import configuration_warnings
    for text in configuration_warnings(config):
        maillog.warning(text)
    return 1 if taken else 0


def taken_over_sockets(status: dict) -> list[str]:
    """Socket paths of a running master that are no longer its own."""
    return [service.get("path") for _, service in sorted(status.get("services", {}).items())
            if status.get("running") and not service.get("removed")
            and service.get("socket") not in (None, "ours")]


def cmd_run(args) -> int:
    master = Master(args.config_dir, stderr=args.stderr, verbose=args.verbose,
                    services_from=args.services_from)
    try:
        master.start()
    except (ConfigError, OSError) as exc:
        raise Failure(str(exc)) from None
    return master.run()


def cmd_start(args) -> int:
    config = load(args)
    pid = master_pid(config)
    if pid:
        raise Failure(f"the {PROGRAM} is already running (pid {pid})")
    if maillog.lines_lost(config.main.get("maillog_file")):
        maillog.warning("neither /dev/log nor maillog_file: the detached master and its "
                        "workers will log nowhere (set maillog_file, or use `run --stderr`)")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        _become_daemon(args, write_end)     # never returns
    os.close(write_end)
    os.waitpid(child, 0)                    # the intermediate process exits at once
    message = _read_report(read_end, START_TIMEOUT)
    os.close(read_end)
    word, _, rest = message.partition(" ")
    daemon_pid_text, _, reason = rest.partition(" ")
    daemon_pid = int(daemon_pid_text) if daemon_pid_text.isdigit() else None
    if word != "ok":
        _abandon(daemon_pid)
        raise Failure(reason or message or "the master exited during start-up -- see logs")
    deadline = time.monotonic() + START_TIMEOUT
    for service in config.services:
        path = service.socket_path(config.main)
        if not service_settings(config.main, service).min_workers:
            # no worker until a client comes: a greeting would start one
            problem = socket_missing(path)
        else:
            problem = check_greeting(path, max(0.5, deadline - time.monotonic()))
        if problem:
            _abandon(daemon_pid)
            raise Failure(problem)
    return 0


def socket_missing(path: str) -> str | None:
    """None when `path` is a socket file (a service started on demand is
    checked so at `start`), else the reason."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"stat {path}: {exc.strerror}"
    return None if stat.S_ISSOCK(mode) else f"{path}: not a socket"


def _read_report(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return f"error 0 no report from the master after {timeout:g}s -- see logs"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _abandon(pid: int | None) -> None:
    """Stop a daemon whose start failed."""
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _become_daemon(args, report_fd: int) -> None:
    """In the forked child: detach with DaemonContext, run the master, and
    report `ok PID` or `error PID reason` on report_fd."""
    status = 1
    try:
        import daemon
        context = daemon.DaemonContext(detach_process=True, files_preserve=[report_fd],
                                       umask=0o022, working_directory="/")
        context.open()
        master = Master(args.config_dir, stderr=False, verbose=args.verbose,
                        services_from=args.services_from)

        def report(error):
            text = f"ok {os.getpid()}\n" if error is None else f"error {os.getpid()} {error}\n"
            try:
                os.write(report_fd, text.encode())
                os.close(report_fd)
            except OSError:
                pass
        master.on_ready = report
        try:
            master.start()
        except (ConfigError, OSError) as exc:
            maillog.error(str(exc))
            report(str(exc))
            os._exit(1)
        status = master.run()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:    # noqa: BLE001 - log, never show a traceback
        try:
            maillog.error(f"master: {type(exc).__name__}: {exc}")
            os.write(report_fd, f"error {os.getpid()} {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def cmd_stop(args) -> int:
    config = load(args)
    path = pidfile.pid_path(config.main.get("queue_directory"))
    pid = pidfile.running_pid(path)
    if not pid:
        raise Failure(f"the {PROGRAM} is not running")
    os.kill(pid, signal.SIGTERM)
    if wait_until(lambda: pidfile.running_pid(path) is None, STOP_TIMEOUT):
        return 0
    print(f"{PROGRAM}: warning: stopping the {PROGRAM} with force", file=sys.stderr)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_until(lambda: pidfile.running_pid(path) is None, 5.0)
    return 0


def cmd_reload(args) -> int:
    config = load_main_cf(args.config_dir, warn=lambda _: None)
    queue = config.get("queue_directory")
    path = pidfile.pid_path(queue)
    pid = pidfile.running_pid(path)
    if not pid:
        raise Failure(f"the {PROGRAM} is not running")
    before = (read_status(queue) or {}).get("reloads", 0)
    os.kill(pid, signal.SIGHUP)
    result: dict = {}

    def acknowledged() -> bool:
        status = read_status(queue) or {}
        if status.get("reloads", 0) > before:
            result.update(status)
            return True
        return False
    if not wait_until(acknowledged, RELOAD_TIMEOUT):
        raise Failure(f"the {PROGRAM} (pid {pid}) did not acknowledge the reload "
                      f"within {RELOAD_TIMEOUT:g}s")
    if result.get("reload_error"):
        raise Failure(f"{result['reload_error']} (reload rejected, the running "
                      f"configuration is unchanged)")
    return 0


def collect_status(config_dir: str) -> dict:
    main = load_main_cf(config_dir, warn=lambda _: None)
    queue = main.get("queue_directory")
    pid = pidfile.running_pid(pidfile.pid_path(queue))
    if not pid:
        return {"running": False, "config_directory": os.path.abspath(config_dir)}
    status = read_status(queue) or {"services": {}}
    status["running"] = True
    status["pid"] = pid
    status["uptime"] = max(0.0, time.time() - status.get("started", time.time()))
    import psutil
    for service in status.get("services", {}).values():
        if service.get("path") and "socket_inode" in service:
            service["socket"] = socket_state(service["path"], service["socket_inode"])
        for worker in service.get("workers", []):
            try:
                proc = psutil.Process(worker["pid"])
                with proc.oneshot():
                    worker["rss"] = proc.memory_info().rss
                    times = proc.cpu_times()
                    worker["cpu"] = round(times.user + times.system, 2)
            except (psutil.Error, KeyError):
                worker["rss"] = None
                worker["cpu"] = None
    return status


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {text}" if days else text


def format_status(status: dict) -> str:
    if not status.get("running"):
        return f"{PROGRAM}: the {PROGRAM} is not running"
    lines = [f"{PROGRAM}: running, pid {status['pid']}, up {format_uptime(status['uptime'])}, "
             f"configuration {status.get('config_directory', '?')}, "
             f"generation {status.get('generation', 0)}, "
             f"hot path {status.get('hot_path', '?')}"]
    if status.get("reload_error"):
        lines.append(f"  last reload rejected: {status['reload_error']}")
    listener = status.get("metrics_listener")
    if listener:
        state = f"pid {listener['pid']}" if listener.get("pid") else "not running"
        lines.append(f"metrics listener {listener.get('address')} ({state})")
    for name, service in sorted(status.get("services", {}).items()):
        workers = service.get("workers", [])
        extra = ", throttled" if service.get("throttled") else ""
        if service.get("socket") == "replaced":
            extra += f", socket {service.get('path')} replaced by another process"
        elif service.get("socket") == "missing":
            extra += f", socket {service.get('path')} missing"
        if not workers and service.get("min_workers") == 0:
            extra += ", the first client starts one"
        lines.append(f"service {name} ({service.get('path')}): {len(workers)} worker(s), "
                     f"maxproc {service.get('maxproc')}{extra}")
        for w in workers:
            rss = f"{w['rss'] / 1048576:.1f}M" if w.get("rss") else "-"
            cpu = f"{w['cpu']:.2f}s" if w.get("cpu") is not None else "-"
            cache = ""
            if w.get("cache_hits") or w.get("cache_misses"):
                cache = (f" cache {w['cache_hits']}/{w['cache_misses']}/"
                         f"{w.get('cache_invalidations', 0)} (hits/misses/invalidations)")
            lines.append(f"  pid {w['pid']:<7} gen {w['generation']:<3} {w['state']:<8} "
                         f"clients {w['clients']:<4} requests {w['requests']:<8} "
                         f"rss {rss:<7} cpu {cpu}{cache}")
        for table, counted in sorted(service.get("tables", {}).items()):
            parts = []
            if counted.get("cache"):     # a remote table's answer cache
                parts.append(f"cache hits {counted['cache'].get('hits', 0)}"
                             f" misses {counted['cache'].get('misses', 0)}")
            if counted.get("pool"):
                parts.append(format_pool(counted["pool"]))
            if parts:
                lines.append(f"  table {table}: {'; '.join(parts)}")
    return "\n".join(lines)


def format_pool(pool: dict) -> str:
    """One line of a backend table's pool figures (metrics.TableCounters'
    "pool" in the status file), summed over the service's workers."""
    conns = pool.get("connections", {})
    text = (f"threads {pool.get('threads', 0)} busy {pool.get('busy', 0)}"
            f" waiting {pool.get('waiting', 0)}, waits {pool.get('waits', 0)}"
            f" ({pool.get('wait_seconds', 0):.3f}s), timeouts {pool.get('timeouts', 0)}"
            f" rejected {pool.get('rejected', 0)}")
    if conns.get("size"):
        text += (f"; connections {conns.get('open', 0)} open of {conns['size']},"
                 f" {conns.get('in_use', 0)} in use, waits {conns.get('waits', 0)}")
    return text


def cmd_status(args) -> int:
    status = collect_status(args.config_dir)
    if args.json:
        emit(json.dumps(status, indent=2, sort_keys=True))
    else:
        emit(format_status(status))
    return 0 if status.get("running") else 1


def config_lines(main, mode: str, names: list[str], expand: bool) -> tuple[list[str], list[str]]:
    """postconf-like `name = value` lines; returns (lines, unknown names)."""
    explicit = main.explicit()
    defaults = main.defaults()
    if mode == "n":
        table = explicit
    elif mode == "d":
        table = defaults
    else:
        table = {**defaults, **explicit}
    unknown = [n for n in names if n not in table and n not in defaults]
    chosen = names or sorted(table)
    lines = []
    for name in chosen:
        if name in unknown:
            continue
        if mode == "n" and name not in explicit:
            continue
        value = table.get(name, defaults.get(name, ""))
        if expand and mode != "d":
            value = main.get(name)
        lines.append(f"{name} = {' '.join(value.split())}".rstrip() if value
                     else f"{name} =")
        if mode == "d" and name == "proxy_read_maps":
            lines.append(other_generation_note(main))
    return lines, unknown


def other_generation_note(main) -> str:
    """A comment line after `config -d`'s proxy_read_maps: the default of
    the other Postfix generation (3.7-3.10 vs 3.11+) and which one applies."""
    release = ".".join(map(str, main.postfix_release()))
    if main.postfix_release() >= (3, 11):
        label, value = "Postfix 3.7-3.10", PROXY_READ_MAPS_DEFAULT
    else:
        label, value = "Postfix 3.11+", PROXY_READ_MAPS_DEFAULT_311
    return (f"# proxy_read_maps of {label} (not in effect: proxymap_postfix_version"
            f" gives {release}) = {value}")


def cmd_config(args) -> int:
    try:
        main = load_main_cf(args.config_dir, warn=lambda _: None)
    except ConfigError as exc:
        raise Failure(str(exc)) from None
    mode = "n" if args.n else "d" if args.d else ""
    try:
        lines, unknown = config_lines(main, mode, args.names, args.x)
    except ConfigError as exc:
        raise Failure(str(exc)) from None
    for name in unknown:
        print(f"{PROGRAM}: warning: {name}: unknown parameter", file=sys.stderr)
    emit("\n".join(lines))
    return 0


COMMANDS = {"start": cmd_start, "stop": cmd_stop, "reload": cmd_reload,
            "status": cmd_status, "run": cmd_run, "check": cmd_check, "config": cmd_config}


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROGRAM, description=
                                "Control the pre-forking proxymap/proxywrite master")
    p.add_argument("-c", dest="config_dir", default=default_config_dir(),
                   help="configuration directory with main.cf and master.cf")
    p.add_argument("-m", dest="services_from", metavar="FILE", default=None,
                   help="take the services from FILE (master.cf format) instead of "
                        "$proxymap_master_cf (default DIR/master.cf)")
    add_version_option(p, PROGRAM)
    p.add_argument("-v", dest="verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("start", help="start a detached master; wait until it serves")
    sub.add_parser("stop", help="stop the running master")
    sub.add_parser("reload", help="re-read main.cf and master.cf")
    s = sub.add_parser("status", help="show the master and its workers")
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="run in the foreground (systemd)")
    r.add_argument("--stderr", action="store_true", help="log to stderr even if syslog exists")
    sub.add_parser("check", help="validate main.cf and master.cf")
    c = sub.add_parser("config", help="show main.cf parameters like postconf")
    group = c.add_mutually_exclusive_group()
    group.add_argument("-n", action="store_true", help="only parameters set in main.cf")
    group.add_argument("-d", action="store_true", help="default values")
    c.add_argument("-x", action="store_true", help="expand $name references")
    c.add_argument("names", nargs="*")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.config_dir = os.path.abspath(args.config_dir)
    maillog.setup(PROGRAM, stderr=True, verbose=args.verbose)
    try:
        return COMMANDS[args.command](args)
    except Failure as exc:
        return fatal(str(exc))
    except ConfigError as exc:
        return fatal(str(exc))
    except OSError as exc:
        return fatal(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
