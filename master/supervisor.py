"""The pre-forking master: listening sockets, worker processes, signals.

This plays the role of Postfix's master(8) for the proxymap services of a
master.cf, with one deliberate difference (documented in
docs/architecture.md): the master accepts every connection itself and
hands it to the least-loaded worker over that worker's control channel
(proxymap/handoff.py), instead of letting children race for accept().

What it mirrors from Postfix:
* socket paths `$queue_directory/{private,public}/NAME`, mode 0666, kept
  open (same inode) across reloads, left on disk at exit;
* workers drop privileges to mail_owner after reading their configuration
  (unprivileged services); exit statuses and the
  "bad command startup -- throttling" rule with service_throttle_time;
* max_use / max_idle / daemon_timeout / ipc_timeout semantics, enforced
  here from the workers' load reports;
* signals: SIGHUP reload, SIGTERM/SIGINT/SIGQUIT stop, handled in the main
  loop only (the handlers just wake the loop's epoll via set_wakeup_fd).

Where it differs: a bad configuration at reload is rejected and the old
one keeps running (Postfix's master would die); the read service's
workers are pre-forked (proxymap_read_min_workers, 1) and respawned when
they die. A service whose minimum is 0 (proxywrite by default,
proxymap_write_min_workers) is started as Postfix's master starts every
service: the master watches its socket while it has no worker, and the
first client makes it fork one (policy.watch_for_first_client); the
worker leaves after max_idle without clients.

The loop is on `select.epoll` directly, and accepted connections stay
plain descriptors from accept() to the hand-over message (no socket
object per connection); the policy's pass over the workers runs when
something it decides on changed (a worker ready, exited, lost; a
connection waiting) and otherwise every MANAGE_INTERVAL, not after every
wake-up: a churn of short sessions wakes the master twice per session.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import select
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import setproctitle

from master import pidfile, sdnotify
from master.master_cf import Service, load_master_cf
from master.policy import (STOP_GRACE, ServiceState, Settings, fixed_values, ignored_changes,
                           manage_workers, needs_another_worker, no_room_for_new_generation,
                           plan_hand_over, retire_used_up, successor_due, use_limit,
                           watch_for_first_client)
from master.workerslot import READY, WorkerSlot, pick_worker
from proxymap import handoff, metrics, protocol
from proxymap.allowlist import proxy_allow_set
from proxymap.conventions import maillog
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.main_cf import CONFIG_DIR_ENV, load_main_cf
from proxymap.conventions.mainconfig import MainConfig
from proxymap.conventions.service_sockets import PRIVATE, PUBLIC, service_socket_path
from proxymap.util import fdlimit
from proxymap.util.unix_listener import BACKLOG, bind_unix_listener

PROGRAM = "proxymap-master"
WORKER_COMMAND = "proxymap"
STATUS_NAME = "proxymap-master.status"

#: seconds between checks that our socket files are still ours
SOCKET_CHECK_INTERVAL = 1.0
#: fd number of the control channel in the worker
WORKER_FD = 3
LOOP_TICK = 0.5
STATUS_INTERVAL = 0.1
#: connections accepted in one go before they are handed over
ACCEPT_BATCH = 64
#: seconds between the policy's passes when nothing prompts one (its
#: timed rules: pings every 0.2 s at the most, the rest in seconds)
MANAGE_INTERVAL = 0.1


def status_path(queue_directory: str) -> str:
    return os.path.join(queue_directory, "pid", STATUS_NAME)


def worker_executable() -> list[str]:
    """argv prefix that starts our worker program: the `proxymap` console
    script installed next to this interpreter, else `python -m`."""
    script = os.path.join(os.path.dirname(sys.executable), WORKER_COMMAND)
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "proxymap.server"]


def socket_state(path: str, inode) -> str:
    """"ours" while `path` is the socket file we bound (same device and
    inode), "replaced" when another process bound a new one there (Postfix's
    master with its proxymap line still in master.cf), "missing" when it
    is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return "ours" if inode is not None and (st.st_dev, st.st_ino) == tuple(inode) \
        else "replaced"


def describe_exit(status: int) -> str | None:
    """Postfix's wording for an abnormal wait status, None for exit 0."""
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return None if code == 0 else f"exit status {code}"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"wait status {status}"


def is_proxymap_command(service: Service) -> bool:
    return os.path.basename(service.command) == WORKER_COMMAND


@dataclass
class Credentials:
    user: str
    uid: int
    gid: int


def mail_owner_credentials(main: MainConfig) -> Credentials:
    """Validate mail_owner as Postfix does (known, not root, unique uid)."""
    name = main.get("mail_owner")
    where = "parameter mail_owner"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise main.locate("mail_owner", f"{where}: unknown user name value: {name}") from None
    if pw.pw_uid == 0:
        raise main.locate("mail_owner", f"{where}: user {name} has privileged user ID")
    if pw.pw_gid == 0:
        raise main.locate("mail_owner", f"{where}: user {name} has privileged group ID")
    return Credentials(name, pw.pw_uid, pw.pw_gid)


@dataclass
class Configuration:
    """Everything read from main.cf + master.cf, validated."""
    main: MainConfig
    services: list[Service]
    owner: Credentials | None
    skipped: list[Service] = field(default_factory=list)
    #: the master.cf-format file the services came from
    service_file: str = ""


def service_file(main: MainConfig, override: str | None = None) -> str:
    """The master.cf-format file our services come from: `-m FILE` when
    given, else $proxymap_master_cf (default $config_directory/master.cf);
    relative names are taken from the configuration directory."""
    name = override or main.get("proxymap_master_cf") or "master.cf"
    return os.path.join(main.config_directory, name)


def load_configuration(config_dir: str, warn=None, workers: bool = False,
                       services_from: str | None = None) -> Configuration:
    """Read and check main.cf and the service file (see service_file());
    ConfigError (one line, file and line) on any problem, including the
    numbers the master itself needs. With `workers` (check, reload) also
    the values only workers read, so a reload cannot replace serving
    workers by ones that die at startup; a service whose first worker
    starts only on demand (min_workers 0) has them checked always, so that
    `start` still refuses a configuration its worker would die of, instead
    of the first client finding out."""
    main = load_main_cf(config_dir, warn=warn)
    services = load_master_cf(config_dir, main, warn=warn,
                              path=service_file(main, services_from))
    owner = mail_owner_credentials(main) if os.geteuid() == 0 else None
    for name in ("queue_directory",):
        if not main.get(name).startswith("/"):
            raise main.locate(name, f"parameter {name}: not an absolute path: "
                                    f"{main.get(name)}")
    main.get_int("default_process_limit")
    main.get_time("service_throttle_time")
    metrics_listen(main)
    if workers:     # check, reload: the log file the master and workers will open
        try:
            maillog.check_log_file(main.get("maillog_file"), main.get("maillog_file_prefixes"))
        except maillog.LogFileError as exc:
            raise main.locate("maillog_file", str(exc)) from None
    used, skipped = [], []
    for service in services:
        if service.type == "unix" and is_proxymap_command(service):
            try:
                settings = service_settings(main, service)     # raises on bad -o values
                if workers or not settings.min_workers:
                    check_worker_settings(main, service)
            except ConfigError as exc:
                if exc.filename:                  # a main.cf value: already located
                    raise
                raise ConfigError(f"service {service.name}: {exc}", service.filename,
                                  service.line, sep=": line") from None
            used.append(service)
        else:
            skipped.append(service)
    return Configuration(main, used, owner, skipped, service_file(main, services_from))


def metrics_listen(main: MainConfig) -> tuple[str, object] | None:
    """proxymap_metrics_listen parsed (master/exporter.py), None when
    unset; ConfigError with file and line for a bad value."""
    from master import exporter
    value = main.get("proxymap_metrics_listen").strip()
    if not value:
        return None
    try:
        return exporter.parse_listen(value)
    except ValueError as exc:
        raise main.locate("proxymap_metrics_listen",
                          f"parameter proxymap_metrics_listen: {exc}") from None


def not_served(service: Service) -> str:
    """What is said of a master.cf entry whose command we do not run."""
    return (f"{service.filename}: line {service.line}: service {service.name}/{service.type}:"
            f" command {service.command} is not served by {PROGRAM}")


def check_worker_settings(main: MainConfig, service: Service) -> None:
    """Build (and discard) what a worker of `service` builds at startup, so a
    value only workers read (ipc_timeout, proxymap_max_*, smtputf8_enable,
    the allow-lists, the service name) raises ConfigError here."""
    from proxymap.server import make_worker
    cfg = main.with_overrides(service.overrides)
    for name in ("proxy_read_maps", "proxy_write_maps"):
        try:
            proxy_allow_set(cfg.get(name))
        except ConfigError as exc:
            raise cfg.locate(name, f"parameter {name}: {exc.reason}") from None
    make_worker(cfg, service.name).close()    # ConfigError for a name that is no role


def service_settings(main: MainConfig, service: Service) -> Settings:
    cfg = main.with_overrides(service.overrides)
    maxproc = service.maxproc
    if service.name == main.get("proxywrite_service_name") and maxproc != 1:
        maxproc = 1                                 # the single updater
    return Settings(cfg.get_int("max_use"), cfg.get_time("max_idle"),
                    cfg.get_time("daemon_timeout"), cfg.get_time("service_throttle_time"),
                    maxproc, cfg.get_int("proxymap_worker_busy_clients"),
                    cfg.get_int(min_workers_parameter(cfg, service.name)))


def min_workers_parameter(cfg: MainConfig, name: str) -> str:
    """The parameter that says how many workers of service `name` are kept
    when idle: the write service's (0 by default: most sites never update
    a table through proxywrite, and a worker started on demand costs its
    first client a fork of the preloaded master), else the read service's
    (1: lookups come all the time and want no wait)."""
    from proxymap.server import WRITE_SERVICE, role_of
    if role_of(name, cfg) == WRITE_SERVICE:
        return "proxymap_write_min_workers"
    return "proxymap_read_min_workers"


def same_definition(a: Service, b: Service) -> bool:
    """Whether two master.cf entries start identical workers (the line
    number may differ)."""
    return all(getattr(a, name) == getattr(b, name)
               for name in ("type", "private", "unpriv", "chroot", "maxproc", "command", "args"))


@dataclass
class ExporterProcess:
    """The metrics listener: its main.cf value, socket and process."""
    value: str
    sock: socket.socket
    address: str
    throttle_time: int
    pid: int | None = None
    restart_at: float = 0.0


class Master:
    def __init__(self, config_dir: str, stderr: bool = False, verbose: int = 0,
                 services_from: str | None = None):
        self.config_dir = os.path.abspath(config_dir)
        #: `-m FILE`: the service file named on the command line (kept for reloads)
        self.services_from = os.path.abspath(services_from) if services_from else None
        self.stderr = stderr
        self.verbose = verbose
        self.services: dict[tuple[str, str], ServiceState] = {}
        self.by_pid: dict[int, WorkerSlot] = {}
        #: the loop's epoll and what each descriptor in it is:
        #: fd -> ("signal" | "listener" | "worker", object)
        self.poll = select.epoll()
        self.handlers: dict[int, tuple[str, object]] = {}
        #: something the policy decides on changed: pass over the workers
        #: now rather than at the next MANAGE_INTERVAL
        self.manage_due = True
        self.managed_at = 0.0
        self.generation = 0
        self.forks = 0
        self.reloads = 0
        self.reload_error = ""
        self.started = time.time()
        self.lock_fd: int | None = None
        self.stopping = False
        self.ready_sent = False
        self.on_ready = None            # callback(error or None), once
        self.status_dirty = True
        self.status_written = 0.0
        self.config: Configuration | None = None
        self.queue_directory = ""
        #: values of the parameters a reload does not change, as at start
        self.fixed: dict[str, str] = {}
        self.sockets_checked = 0.0
        #: the metrics listener (master/exporter.py), when configured
        self.exporter: ExporterProcess | None = None
        #: SIGCHLD seen since the last reap(), and when that was
        self.child_exited = True
        self.reaped_at = 0.0

    # -- configuration ----------------------------------------------------------

    def setup_logging(self, main: MainConfig) -> None:
        """Log as main.cf says; ConfigError for an unusable maillog_file."""
        maillog.set_hostname(main.get("myhostname"))
        try:
            maillog.setup(f"{main.get('syslog_name')}/{PROGRAM}", main.get("maillog_file"),
                          stderr=self.stderr, verbose=self.verbose,
                          prefixes=main.get("maillog_file_prefixes"))
        except maillog.LogFileError as exc:
            raise main.locate("maillog_file", str(exc)) from None

    def reopen_logging(self, main: MainConfig) -> None:
        """setup_logging() at reload: a maillog_file that cannot be used
        (checked before, or replaced since, by a symlink say) is refused
        with an error line, and the log file already open stays in use."""
        try:
            self.setup_logging(main)
        except ConfigError as exc:
            maillog.error(f"{exc}")

    def log_skipped(self, config: Configuration) -> None:
        for service in config.skipped:
            maillog.warning(f"{not_served(service)} -- skipped")

    # -- start-up -------------------------------------------------------------------

    def start(self) -> None:
        """Read the configuration, lock, bind and spawn. Raises ConfigError or
        OSError (callers turn them into one-line fatals)."""
        config = load_configuration(self.config_dir, services_from=self.services_from)
        self.config = config
        main = config.main
        self.setup_logging(main)
        self.fixed = fixed_values(main)
        self.queue_directory = self.fixed["queue_directory"]
        prepare_directories(main, config.owner)
        try:
            self.lock_fd = pidfile.acquire(pidfile.pid_path(self.queue_directory))
        except pidfile.LockBusy:
            raise OSError(f"open lock file {pidfile.pid_path(self.queue_directory)}: "
                          f"unable to set exclusive lock: the {PROGRAM} is already running") \
                from None
        os.environ[CONFIG_DIR_ENV] = self.config_dir
        self.install_signals()
        fdlimit.raise_open_limit()
        self.accept_guard = fdlimit.AcceptGuard("accept connection", maillog.warning)
        preload_worker(config)
        warm_worker_start(main)
        self.log_skipped(config)
        for service in config.services:
            self.add_service(service, main)
        listen = metrics_listen(main)
        if listen is not None:
            self.start_exporter(listen, main)
        maillog.info(f"daemon started -- configuration {self.config_dir}"
                     f" -- hot path {protocol.IMPLEMENTATION}")
        self.manage(time.monotonic())

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                       signal.SIGCHLD):
            signal.signal(signum, _note_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.watch(self.wake_r, "signal", None)

    def watch(self, fd: int, kind: str, obj) -> None:
        """Wake the loop when `fd` is readable; it dispatches on `kind`."""
        self.poll.register(fd, select.EPOLLIN)
        self.handlers[fd] = (kind, obj)

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.poll.unregister(fd)
            except (OSError, ValueError):
                pass

    def socket_path(self, service: Service) -> str:
        return service_socket_path(self.queue_directory, service.name, service.private)

    def add_service(self, service: Service, main: MainConfig) -> ServiceState:
        state = ServiceState(service, service_settings(main, service),
                             self.socket_path(service), self.generation)
        self.bind(state, main)
        self.services[service.identity()] = state
        return state

    def bind(self, state: ServiceState, main: MainConfig) -> None:
        state.listener = bind_socket(state.path, main, self.config.owner)
        st = os.stat(state.path)
        state.inode = (st.st_dev, st.st_ino)
        state.taken_over = False

    def rebind(self, state: ServiceState, main: MainConfig) -> None:
        """A new socket in place of one another process replaced; pending
        connections of the old one are still served."""
        listening = state.listening
        self.set_listening(state, False)
        old = state.listener
        try:
            self.bind(state, main)
        except OSError as exc:
            state.listener = old
            maillog.error(f"service {state.name}: {exc}")
            self.set_listening(state, listening)
            return
        old.close()
        maillog.info(f"service {state.name}: socket {state.path} bound again")
        self.set_listening(state, listening)

    def check_sockets(self, now: float) -> None:
        """Log once when a socket file stops being ours."""
        if now - self.sockets_checked < SOCKET_CHECK_INTERVAL:
            return
        self.sockets_checked = now
        for state in self.services.values():
            if state.removed or state.listener is None:
                continue
            taken = socket_state(state.path, state.inode) != "ours"
            if taken and not state.taken_over:
                maillog.warning(f"service {state.name}: socket file {state.path} is no longer "
                                f"ours (replaced or removed by another process) -- clients "
                                f"cannot reach us; `reload` binds it again")
            state.taken_over = taken
            self.status_dirty = True

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        while not self.stopping:
            timeout = STATUS_INTERVAL if self.status_dirty else LOOP_TICK
            for fd, _ in self.poll.poll(timeout):
                handler = self.handlers.get(fd)
                if handler is None:
                    continue        # unwatched by an earlier one of this batch
                kind, obj = handler
                if kind == "signal":
                    self.handle_signals()
                elif kind == "listener":
                    self.accept(obj)
                elif kind == "worker":
                    self.worker_readable(obj)
                if self.stopping:
                    break
            if self.stopping:
                break
            now = time.monotonic()
            # children are reaped when SIGCHLD said one exited, and once a
            # tick in case that signal's byte was lost (a full wake-up pipe):
            # not a waitpid() per connection handed over
            if self.child_exited or now - self.reaped_at >= LOOP_TICK:
                self.child_exited = False
                self.reaped_at = now
                self.reap()
            if self.manage_due or now - self.managed_at >= MANAGE_INTERVAL:
                self.manage(now)
            self.write_status(now)
        return self.shutdown()

    def handle_signals(self) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        if signal.SIGCHLD in data:
            self.child_exited = True
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                maillog.info(f"terminating on signal {signum}")
                self.stopping = True
                return
        if signal.SIGHUP in data:
            self.reload()

    # -- connections ------------------------------------------------------------------

    def accept(self, state: ServiceState) -> None:
        """Accept every connection waiting (at most ACCEPT_BATCH), then hand
        them over together: a worker's share travels in one message. They
        are descriptors, never socket objects: the master only passes them on."""
        clients: list[int] = []
        while len(clients) < ACCEPT_BATCH and state.listener is not None and state.listening:
            try:
                client = self.accept_guard.accept(state.listener)
            except OSError as exc:
                maillog.warning(f"accept connection: {exc.strerror}")
                break
            if client is None:
                break
            clients.append(client)
        if clients:
            self.hand_over(state, clients)

    def hand_over(self, state: ServiceState, clients: list[int]) -> bool:
        """Share `clients` out among the ready workers (policy.plan_hand_over:
        least-loaded first, max_use respected), several to a message; those
        no worker can take now wait in state.pending. True when all went."""
        now = time.monotonic()
        waiting = deque(clients)
        tried: set[int] = set()
        while waiting:
            plan = plan_hand_over([s for s in state.slots if s.pid not in tried],
                                  len(waiting), state.generation, use_limit(state))
            if not plan:
                break
            for slot, count in plan:
                if slot.pid in tried:
                    continue
                batch = [waiting.popleft() for _ in range(count)]
                try:
                    handoff.send_clients(slot.chan, batch)
                except OSError as exc:
                    waiting.extendleft(reversed(batch))
                    tried.add(slot.pid)
                    if not isinstance(exc, BlockingIOError):
                        self.channel_lost(slot)
                    continue
                for client in batch:
                    os.close(client)
                slot.on_handed(now, count)
                state.handed += count
                self.status_dirty = True
                if retire_used_up(state, slot):
                    self.retire(slot, now, "max_use reached")
        if needs_another_worker(state, now) or successor_due(state, now):
            self.spawn(state)
        if waiting:
            state.pending.extend(waiting)
            self.set_listening(state, False)
            self.manage_due = True          # until a worker takes them
            return False
        return True

    def set_listening(self, state: ServiceState, on: bool) -> None:
        if state.listener is None or on == state.listening:
            return
        if on:
            self.watch(state.listener.fileno(), "listener", state)
        else:
            self.unwatch(state.listener.fileno())
        state.listening = on

    # -- workers ----------------------------------------------------------------------

    def spawn(self, state: ServiceState) -> WorkerSlot | None:
        service = state.service
        config = self.config
        master_end, worker_end = handoff.channel_pair()
        argv = worker_executable() + ["-c", self.config_dir, "-n", service.name]
        argv += service.args
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.forks += 1
        env["GENERATION"] = "%o" % self.forks
        argv += ["--master-fd", str(WORKER_FD)]
        env.pop(handoff.OWNER_ENV, None)
        if service.unpriv and config.owner is not None:
            env[handoff.OWNER_ENV] = config.owner.user
        try:
            pid = os.fork()
        except OSError as exc:
            maillog.warning(f"master_spawn: fork: {exc.strerror} -- throttling")
            state.throttle(time.monotonic())
            master_end.close()
            worker_end.close()
            return None
        if pid == 0:
            _run_worker(argv, env, worker_end.fileno(), self.queue_directory)
        worker_end.close()
        slot = WorkerSlot(pid, service.name, state.generation, chan=master_end)
        state.slots.append(slot)
        self.by_pid[pid] = slot
        self.watch(master_end.fileno(), "worker", slot)
        self.status_dirty = True
        maillog.debug(f"service {service.name}: started worker pid {pid}")
        return slot

    def worker_readable(self, slot: WorkerSlot) -> None:
        if slot.chan is None:
            return
        records, eof = handoff.read_messages(slot.chan, handoff.MAX_REPORT_RECORD)
        now = time.monotonic()
        for data, fds in records:
            for fd in fds:
                os.close(fd)
            try:
                if data[:1] == handoff.METRICS:
                    spec, counters = handoff.decode_metrics(data)
                    slot.tables[spec] = counters     # that worker's totals so far
                else:
                    was = slot.state
                    slot.on_status(handoff.decode_status(data), now)
                    if slot.state != was:            # ready: it may take connections
                        self.manage_due = True
            except ValueError as exc:
                maillog.warning(f"worker pid {slot.pid}: {exc}")
                continue
            self.status_dirty = True
        if eof:
            self.channel_lost(slot)

    def channel_lost(self, slot: WorkerSlot) -> None:
        if slot.chan is not None:
            self.unwatch(slot.chan.fileno())
            slot.chan.close()
            slot.chan = None
        slot.on_channel_lost(time.monotonic())
        self.manage_due = True

    def send(self, slot: WorkerSlot, command: bytes) -> None:
        if slot.chan is None:
            return
        try:
            handoff.send_command(slot.chan, command)
        except BlockingIOError:
            pass
        except OSError:
            self.channel_lost(slot)

    def retire(self, slot: WorkerSlot, now: float, why: str) -> None:
        if slot.retire(now):
            maillog.debug(f"worker pid {slot.pid}: retiring ({why})")
            self.send(slot, handoff.RETIRE)
            self.status_dirty = True

    def kill(self, slot: WorkerSlot, signum: int = signal.SIGKILL) -> None:
        slot.kill()
        try:
            os.kill(slot.pid, signum)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.exporter is not None and self.exporter.pid == pid:
                self.exporter_exited(status)
                continue
            slot = self.by_pid.pop(pid, None)
            if slot is None:
                maillog.warning(f"reaped unknown process pid {pid}")
                continue
            self.on_exit(slot, status)
            self.manage_due = True

    def on_exit(self, slot: WorkerSlot, status: int) -> None:
        self.worker_readable(slot)      # its last reports, sent before it exited
        self.channel_lost(slot)
        slot.on_exit(status)
        self.status_dirty = True
        state = self.state_of(slot)
        if state is not None:
            state.slots.remove(slot)
            state.exited_tables = metrics.sum_tables(
                state.exited_tables, {spec: c.ended() for spec, c in slot.tables.items()})
        how = describe_exit(status)
        if how is None or self.stopping:
            return
        command = worker_executable()[0]
        maillog.warning(f"process {command} pid {slot.pid} {how}")
        if not slot.reported and state is not None:
            maillog.warning(f"{command}: bad command startup -- throttling")
            state.throttle(time.monotonic())
            if not self.ready_sent and self.on_ready is not None:
                self.on_ready(f"service {state.name}: worker pid {slot.pid} {how} at startup")
                self.on_ready = None

    def state_of(self, slot: WorkerSlot) -> ServiceState | None:
        for state in self.services.values():
            if slot in state.slots:
                return state
        return None

    # -- policy -----------------------------------------------------------------------

    def manage(self, now: float) -> None:
        self.manage_due = False
        self.managed_at = now
        self.check_sockets(now)
        exporter = self.exporter
        if exporter is not None and exporter.pid is None and now >= exporter.restart_at \
                and not self.stopping:
            self.spawn_exporter()
        for key, state in list(self.services.items()):
            self.manage_service(state, now)
            if state.removed and not state.alive():
                del self.services[key]
        if not self.ready_sent and all(
                any(s.state == READY for s in st.slots) or not st.settings.min_workers
                for st in self.services.values()):
            self.ready_sent = True
            sdnotify.ready()
            if self.on_ready is not None:
                self.on_ready(None)
                self.on_ready = None

    def manage_service(self, state: ServiceState, now: float) -> None:
        """The policy's pass over the workers (master/policy.py), then the
        connections that waited for a ready worker."""
        manage_workers(state, now, self)
        if state.removed:
            return
        if state.pending and pick_worker(state.slots, state.generation) is not None:
            waiting = list(state.pending)
            state.pending.clear()
            self.hand_over(state, waiting)
        if state.pending and watch_for_first_client(state, now):
            self.spawn(state)       # clients waited out a throttle or a retirement
        ready = pick_worker(state.slots, state.generation) is not None
        self.set_listening(state, (ready or watch_for_first_client(state, now))
                           and not state.pending)

    # -- reload ---------------------------------------------------------------------

    def reload(self) -> None:
        sdnotify.reloading()
        self.reloads += 1
        try:
            config = load_configuration(self.config_dir, workers=True,
                                        services_from=self.services_from)
        except ConfigError as exc:
            self.reload_error = str(exc)
            self.reopen_logging(self.config.main)       # reopen the log all the same
            maillog.info(f"reload -- configuration {self.config_dir}")
            maillog.error(f"{exc}")
            maillog.error("reload rejected -- the running configuration is unchanged")
        else:
            self.reload_error = ""
            self.apply(config)
        self.reopen_worker_logs()
        self.status_dirty = True
        sdnotify.ready()

    def reopen_worker_logs(self) -> None:
        """Pass the maillog_file just reopened to every worker: workers kept
        across the reload would otherwise write to a rotated file for ever,
        and having dropped privileges they may not reopen it themselves."""
        fd = maillog.log_file_descriptor()
        if fd is None:
            return
        for slot in list(self.by_pid.values()):
            if slot.chan is None:
                continue
            try:
                handoff.send_descriptor(slot.chan, handoff.LOG_FILE, fd)
            except OSError:
                pass    # a full or dead channel: that worker is on its way out

    def apply(self, config: Configuration) -> None:
        old = self.config
        main = config.main
        self.reopen_logging(main)           # reopens maillog_file (log rotation)
        maillog.info(f"reload -- configuration {self.config_dir}")
        main_changed = old is None or old.main.explicit() != main.explicit()
        for line in ignored_changes(self.fixed, main):
            maillog.warning(line)
        if old is not None and (config.owner != old.owner):
            maillog.warning("mail_owner changed: sockets keep their old owner until restart")
        self.config = config
        self.log_skipped(config)
        self.reload_exporter(main)
        self.generation += 1
        now = time.monotonic()
        wanted = {service.identity(): service for service in config.services}
        for key, state in self.services.items():
            if key not in wanted and not state.removed:
                state.removed = True
                self.set_listening(state, False)
                state.listener.close()
                state.listener = None
                for client in state.pending:
                    os.close(client)
                state.pending.clear()
                for slot in state.alive():
                    self.retire(slot, now, "service removed")
        for key, service in wanted.items():
            state = self.services.get(key)
            if state is None or state.removed:
                if state is not None:      # removed earlier, back again: fresh socket
                    del self.services[key]
                self.add_service(service, main)
                continue
            if socket_state(state.path, state.inode) != "ours":
                self.rebind(state, main)
            unchanged = not main_changed and same_definition(state.service, service)
            state.service = service
            state.settings = service_settings(main, service)
            if unchanged:
                continue            # nothing a worker reads has changed: keep them
            state.generation = self.generation
            if no_room_for_new_generation(state):
                # the old worker goes first, connections wait in the backlog
                for slot in state.alive():
                    self.retire(slot, now, "configuration reloaded")
        preload_worker(config)
        self.manage(now)

    # -- the metrics listener ------------------------------------------------------

    def start_exporter(self, listen, main: MainConfig) -> None:
        """Bind the listener (OSError: caller's fatal or error) and fork
        the process that serves it."""
        from master import exporter
        owner = self.config.owner
        sock = exporter.bind(listen, owner.uid if owner else -1, owner.gid if owner else -1)
        self.exporter = ExporterProcess(main.get("proxymap_metrics_listen").strip(), sock,
                                        exporter.address_of(sock),
                                        main.get_time("service_throttle_time"))
        maillog.info(f"metrics: listening on {self.exporter.address}")
        self.spawn_exporter()

    def spawn_exporter(self) -> None:
        state = self.exporter
        try:
            pid = os.fork()
        except OSError as exc:
            maillog.warning(f"metrics listener: fork: {exc.strerror} -- throttling")
            state.restart_at = time.monotonic() + state.throttle_time
            return
        if pid == 0:
            _run_exporter(state.sock, status_path(self.queue_directory), self.config.owner,
                          self.queue_directory, self.config_dir)
        state.pid = pid
        self.status_dirty = True

    def exporter_exited(self, status: int) -> None:
        state = self.exporter
        pid, state.pid = state.pid, None
        self.status_dirty = True
        if self.stopping:
            return
        maillog.warning(f"process {exporter_title()} pid {pid} "
                        f"{describe_exit(status) or 'exit status 0'}"
                        f" -- restarting it in {state.throttle_time}s")
        state.restart_at = time.monotonic() + state.throttle_time

    def stop_exporter(self) -> None:
        """End the listener process (by its pid) and close its socket."""
        state, self.exporter = self.exporter, None
        if state is None:
            return
        if state.pid is not None:
            try:
                os.kill(state.pid, signal.SIGTERM)
                deadline = time.monotonic() + STOP_GRACE
                while time.monotonic() < deadline:
                    done, _ = os.waitpid(state.pid, os.WNOHANG)
                    if done:
                        break
                    time.sleep(0.02)
                else:
                    os.kill(state.pid, signal.SIGKILL)
                    os.waitpid(state.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        state.sock.close()
        self.status_dirty = True

    def reload_exporter(self, main: MainConfig) -> None:
        """A changed proxymap_metrics_listen: the old listener goes, the new
        one is bound (a bind error is logged; the master goes on without)."""
        value = main.get("proxymap_metrics_listen").strip()
        if (self.exporter.value if self.exporter else "") == value:
            return
        self.stop_exporter()
        listen = metrics_listen(main)
        if listen is None:
            return
        try:
            self.start_exporter(listen, main)
        except OSError as exc:
            maillog.error(f"metrics listener: {exc.strerror or exc}")

    # -- stop -------------------------------------------------------------------------

    def shutdown(self) -> int:
        sdnotify.stopping()
        for state in self.services.values():
            self.set_listening(state, False)
            if state.listener is not None:
                state.listener.close()
                state.listener = None
            for client in state.pending:
                os.close(client)
            state.pending.clear()
        for slot in list(self.by_pid.values()):
            self.send(slot, handoff.STOP)
            self.kill(slot, signal.SIGTERM)
        self.wait_for_workers(STOP_GRACE)
        for slot in list(self.by_pid.values()):
            maillog.warning(f"worker pid {slot.pid} still running after {STOP_GRACE:g}s "
                            f"-- killing it")
            self.kill(slot, signal.SIGKILL)
        self.wait_for_workers(STOP_GRACE)
        self.stop_exporter()
        self.status_dirty = True
        self.write_status(time.monotonic(), force=True, running=False)
        return 0

    def wait_for_workers(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while self.by_pid and time.monotonic() < deadline:
            self.reap()
            if not self.by_pid:
                break
            self.poll.poll(0.05)
            try:
                os.read(self.wake_r, 512)
            except BlockingIOError:
                pass

    # -- status ---------------------------------------------------------------------

    def snapshot(self, running: bool = True) -> dict:
        now = time.monotonic()
        services = {}
        for state in self.services.values():
            services[state.name] = {
                "type": state.service.type, "path": state.path,
                "maxproc": state.settings.maxproc, "generation": state.generation,
                "min_workers": state.settings.min_workers,
                "handed": state.handed,
                "throttled": state.throttled(now), "pending": len(state.pending),
                "removed": state.removed, "socket_inode": state.inode,
                "workers": [s.snapshot() for s in state.slots if s.alive],
                **metrics_snapshot(state.tables())}
        return {"pid": os.getpid(), "running": running, "started": self.started,
                "config_directory": self.config_dir,
                "queue_directory": self.queue_directory, "generation": self.generation,
                "reloads": self.reloads, "reload_error": self.reload_error,
                "ready": self.ready_sent, "services": services,
                # the workers are forked from this process: its choice is theirs
                "hot_path": protocol.IMPLEMENTATION,
                "metrics_listener": None if self.exporter is None else {
                    "address": self.exporter.address, "pid": self.exporter.pid}}

    def write_status(self, now: float, force: bool = False, running: bool = True) -> None:
        if not self.status_dirty or (not force and now - self.status_written < STATUS_INTERVAL):
            return
        path = status_path(self.queue_directory)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            # json.dumps encodes in C in one go; json.dump writes piece by
            # piece from Python (the status is rewritten up to 10 times a second)
            text = json.dumps(self.snapshot(running))
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            maillog.warning(f"write {path}: {exc.strerror}")
        self.status_dirty = False
        self.status_written = now


def metrics_snapshot(tables: dict) -> dict:
    """A service's part of the status file: counters by table, their sum
    over the tables, and the connection errors (proxymap/metrics.py)."""
    no_table = tables.get(metrics.NO_TABLE)
    total = metrics.TableCounters()
    for counters in tables.values():
        total.add(counters)
    return {"tables": {spec: c.as_json() for spec, c in sorted(tables.items())},
            "totals": total.as_json(),
            "connection_errors": no_table.errors if no_table is not None else 0}


def _note_signal(signum, frame) -> None:
    """Signal handlers do nothing: set_wakeup_fd already queued the number."""


def _run_worker(argv, env, chan_fd, queue_directory) -> None:
    """In the forked child: become the worker without exec.

    The master has the worker's code loaded (preload_worker()), so the
    child calls proxymap.server.main() directly: a replacement worker costs
    a fork, not a new interpreter (max_use retires a worker every 100
    clients by default). Everything the master held is closed first except
    the channel, which moves to WORKER_FD; no table is open in the master,
    so none is inherited. The worker drops privileges itself once it has
    read its configuration (as Postfix daemons do), see
    handoff.drop_privileges(). `argv` is the command line an exec would
    have used, kept for `ps` and for the argument parser."""
    def worker() -> int:
        # the title first: setproctitle needs the environment it started with
        setproctitle.setproctitle(" ".join([WORKER_COMMAND] + argv[argv.index("-c"):]))
        os.environ.clear()
        os.environ.update(env)
        from proxymap import server
        return server.main(argv[argv.index("-c"):])
    _run_child(f"master_spawn: {argv[0]}", chan_fd, queue_directory, worker)


def _run_exporter(sock: socket.socket, status_file: str, owner: Credentials | None,
                  queue_directory: str, config_dir: str) -> None:
    """In the forked child: serve the metrics listener (master/exporter.py)
    with nothing else of the master's open, as mail_owner."""
    def listener() -> int:
        from master import exporter
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        listening = socket.socket(fileno=WORKER_FD)
        setproctitle.setproctitle(f"{exporter.TITLE} -c {config_dir} "
                                  f"{exporter.address_of(listening)}")
        master_pid = os.getppid()
        if owner is not None and os.geteuid() == 0:
            exporter.preload()
            handoff.drop_privileges(owner.user)
        exporter.serve(listening, status_file, master_pid)
        return 0
    _run_child("metrics listener", sock.fileno(), queue_directory, listener)


def exporter_title() -> str:
    from master import exporter
    return exporter.TITLE


def _run_child(what: str, keep_fd: int, queue_directory: str, body) -> None:
    """The frame of a forked child of the master: default signal handling,
    `keep_fd` moved to WORKER_FD and every other descriptor above stderr
    closed, the queue directory as working directory; then body(), whose
    result is the exit status. Never returns."""
    status = 127
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                       signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        if keep_fd != WORKER_FD:
            os.dup2(keep_fd, WORKER_FD, inheritable=False)
        os.closerange(WORKER_FD + 1, _max_fd())
        try:
            os.chdir(queue_directory)
        except OSError:
            pass
        status = body()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:    # noqa: BLE001 - the child must never return
        try:
            os.write(2, f"{PROGRAM}[{os.getpid()}]: fatal: {what}: {exc}\n".encode())
        except OSError:
            pass
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:   # noqa: BLE001
            pass
        os._exit(status or 0)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 65536


def preload_worker(config: Configuration) -> None:
    """Import the worker and the table types the services of `config` may
    open, in the master, so that forked workers start with them loaded
    (and share those pages). Types no service names stay unloaded; a reload
    that names a new one calls this again before it forks."""
    from proxymap import multiserver, server  # noqa: F401 - server.main() imports multiserver
    from proxymap.tables import preload
    for service in config.services:
        cfg = config.main.with_overrides(service.overrides)
        try:
            preload(server.allowed_tables(cfg, server.service_role(cfg, service.name)))
        except ConfigError:
            pass    # the worker reports it when it starts


def warm_worker_start(main: MainConfig) -> None:
    """Fill, once in the master, the per-process caches that every forked
    worker would otherwise fill again at its start (a `max_use` retirement
    every 100 clients): the installed Postfix's release, which costs a
    `postconf` run (MainConfig.postfix_release), and inotify_simple's
    search for the C library, which costs an `ldconfig -p` run; and the
    worker's argument parser (proxymap.server.argument_parser). As root,
    also the C library's group database look-up that a worker's switch to
    mail_owner needs (initgroups, handoff.drop_privileges): loaded here once,
    not in every worker."""
    try:
        main.postfix_release()
    except ConfigError:
        pass            # the worker says so, with file and line
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(main.get("mail_owner"))
            os.getgrouplist(owner.pw_name, owner.pw_gid)
        except (KeyError, OSError):
            pass        # load_configuration has said what is wrong
    from proxymap import server
    from proxymap.filewatch import FileWatcher
    FileWatcher().close()
    server.argument_parser()


# -- directories and sockets ------------------------------------------------------------

def prepare_directories(main: MainConfig, owner: Credentials | None) -> None:
    """queue_directory with pid/ (root), private/ (0700) and public/ (0710)
    owned by mail_owner, and data_directory (0700 mail_owner), as
    `postfix check` would create them."""
    queue = main.get("queue_directory")
    os.makedirs(queue, mode=0o755, exist_ok=True)
    os.makedirs(os.path.join(queue, "pid"), mode=0o755, exist_ok=True)
    group = owner.gid if owner else -1
    if owner is not None:
        try:
            group = grp.getgrnam(main.get("setgid_group")).gr_gid
        except KeyError:
            pass
    for sub, mode, gid in ((PRIVATE, 0o700, owner.gid if owner else -1),
                           (PUBLIC, 0o710, group)):
        path = os.path.join(queue, sub)
        os.makedirs(path, mode=mode, exist_ok=True)
        if owner is not None:
            os.chown(path, owner.uid, gid)
        os.chmod(path, mode)
    data = main.get("data_directory")
    if data:
        os.makedirs(data, mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(data, owner.uid, owner.gid)


def bind_socket(path: str, main: MainConfig, owner: Credentials | None) -> socket.socket:
    """A service's listening socket at path, owned by mail_owner, with a
    backlog of at least default_process_limit."""
    backlog = max(main.get_int("default_process_limit"), BACKLOG)
    return bind_unix_listener(path, backlog, (owner.uid, owner.gid) if owner else None)
