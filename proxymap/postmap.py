"""proxymap-postmap: Postfix's postmap(1) for the tables this project serves.

Same command line, flags and exit codes as postmap 3.7: without a mode
option each `[type:]file` is rebuilt from its source file `file`; `-q`
looks keys up, `-s` lists a table, `-d` deletes keys, `-i` adds `key value`
lines from stdin. `-N`/`-n` force the trailing-NUL convention, `-f` turns
off key folding, `-r`/`-w` replace/ignore duplicates. The default flags are
postmap's: DUP_WARN|FOLD_FIX, UTF8_REQUEST when smtputf8_enable is on
(`-u` turns it off), LOCK for -q/-s/-d.

`proxy:type:name` tables are served through proxymap (-q, -s) or proxywrite
(-d) with proxymap.client; unlike postmap 3.7 we also list them with -s.
Building and -i through the proxy are refused, as postmap does.

Like Postfix's UTF-8 layer, with UTF-8 on this program (not the table)
folds keys with full Unicode case folding and skips keys and source lines
that are not UTF-8; with it off, tables fold ASCII only.

Messages go to stderr as `proxymap-postmap: warning: ...` / `fatal: ...`;
exit status 0 = success / found, 1 = not found or any fatal error.
"""

from __future__ import annotations

import contextlib
import getopt
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from proxymap import dictflags as F
from proxymap.client import ProxyClient, ProxyError, ProxyRefused, ProxyTable
from proxymap.conventions.main_cf import default_config_dir
from proxymap.conventions.service_sockets import service_socket_path
from proxymap.utf8 import is_utf8, utf8_key
from proxymap.protocol import CONFIG, NOKEY, OK
from proxymap.tables import (TableError, TableOpenError, Unsupported, open_table, split_spec,
                             table_class)
from proxymap.tables.source import read_entries

PROG = "proxymap-postmap"
USAGE = (f"usage: {PROG} [-bfFhimnNoprsuUvw] [-c config_dir] [-d key] [-q key]"
         " [map_type:]file...")
OPTSTRING = "bc:d:fFhimnNopq:rsuUvw"
PROXY = "proxy"
STDIN_PATH = "/dev/stdin"


class Fatal(Exception):
    """Ends the program with `fatal: <message>` and exit status 1."""


# -- command line ----------------------------------------------------------------

@dataclass
class Options:
    config_dir: str = ""
    mode: str = "build"          # build, query, sequence, delete, incremental
    key: str | None = None       # -q / -d argument ("-" = keys from stdin)
    fold: bool = True            # -f clears
    nul: int = 0                 # F.TRY1NULL (-N), F.TRY0NULL (-n) or 0
    dup: int = F.DUP_WARN        # F.DUP_REPLACE (-r), F.DUP_IGNORE (-w)
    utf8: bool = True            # -u clears
    as_owner: bool = False       # -o: keep root privileges when building
    save_perm: bool = True       # -p clears
    verbose: int = 0
    tables: list[str] = field(default_factory=list)


def parse_args(argv: list[str], environ=os.environ) -> Options:
    """postmap's options (GNU order: options may follow operands)."""
    try:
        pairs, operands = getopt.gnu_getopt(argv, OPTSTRING)
    except getopt.GetoptError as exc:
        raise Fatal(f"{exc} -- {USAGE}") from None
    opts = Options(config_dir=default_config_dir(environ))
    modes = set()
    for opt, arg in pairs:
        if opt == "-c":
            opts.config_dir = arg
        elif opt == "-q":
            modes.add("query")
            opts.key = arg
        elif opt == "-d":
            modes.add("delete")
            opts.key = arg
        elif opt == "-s":
            modes.add("sequence")
        elif opt == "-i":
            opts.mode = "incremental"
        elif opt == "-f":
            opts.fold = False
        elif opt == "-N":
            opts.nul = F.TRY1NULL
        elif opt == "-n":
            opts.nul = F.TRY0NULL
        elif opt == "-r":
            opts.dup = F.DUP_REPLACE
        elif opt == "-w":
            opts.dup = F.DUP_IGNORE
        elif opt == "-u":
            opts.utf8 = False
        elif opt == "-o":
            opts.as_owner = True
        elif opt == "-p":
            opts.save_perm = False
        elif opt == "-v":
            opts.verbose += 1
        elif opt in ("-b", "-h", "-m"):
            raise Fatal("options -b, -h and -m (keys from message headers or body)"
                        " are not supported")
        elif opt == "-F":
            raise Fatal("option -F (values from files) is not supported")
        # -U only matters together with -b/-h: accepted, nothing to do.
    if len(modes) > 1:
        raise Fatal("specify only one of -s -q or -d")
    if modes:
        opts.mode = modes.pop()
    if not operands:
        raise Fatal(USAGE)
    opts.tables = operands
    return opts


def dict_flags(opts: Options, smtputf8: bool) -> int:
    """The flags word postmap uses for its tables."""
    flags = opts.dup
    if opts.fold:
        flags |= F.FOLD_FIX
    if opts.utf8 and smtputf8:
        flags |= F.UTF8_REQUEST
    if opts.nul:
        flags |= opts.nul
    if opts.mode in ("query", "sequence", "delete"):
        flags |= F.LOCK
    return flags


def table_spec(arg: str, default_type: str) -> tuple[str, str]:
    """`[type:]name` -> (type, name); a bare name gets the default type.
    For `proxy:type:name` the type is `proxy` and the name `type:name`."""
    if ":" not in arg:
        return default_type, arg
    try:
        return split_spec(arg)
    except ValueError:
        raise Fatal(f"need dictionary type:name, got {arg!r}") from None


# -- messages ------------------------------------------------------------------------

def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def verbose_message(opts: Options, message: str) -> None:
    if opts.verbose:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def for_stdin(report: Callable[[str], None]) -> Callable[[str], None]:
    """Name standard input `stdin` in messages, as postmap does."""
    def report_stdin(message: str) -> None:
        if message.startswith(STDIN_PATH):
            message = "stdin" + message[len(STDIN_PATH):]
        report(message)
    return report_stdin


def show(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# -- the UTF-8 layer on source entries --------------------------------------------

def utf8_entries(entries: Iterable[tuple[bytes, bytes]], fold: bool, source: str,
                 report: Callable[[str], None]) -> Iterator[tuple[bytes, bytes]]:
    """Entries as Postfix's UTF-8 layer lets them through: records whose key
    or value is not UTF-8 are skipped with a warning, keys are case-folded
    (full Unicode folding) when `fold`."""
    for key, value in entries:
        folded = utf8_key(key, fold)
        if folded is None or not is_utf8(value):
            report(f"{source}: non-UTF-8 input \"{show(key)} {show(value)}\""
                   " -- skipping this entry")
            continue
        yield folded, value


# -- one table, local or through the proxy, with one status-returning interface ------

class LocalTable:
    """A table opened in this process, seen like a ProxyTable: operations
    return statuses, and the UTF-8 layer (fold here, FOLD bits off for the
    table) runs in front of it when `utf8` is on."""

    def __init__(self, table, utf8: bool):
        self.table = table
        self.utf8 = utf8

    def _run(self, operation, key: bytes, *args):
        """(done, result) of operation(key, *args); done False when the
        UTF-8 layer refused the key. TableError propagates; an operation
        the table type lacks is fatal at once."""
        t = self.table
        if not self.utf8:
            return True, _supported(operation, key, *args)
        key = utf8_key(key, bool(t.flags & F.FIXED and t.flags & F.FOLD_FIX))
        if key is None:
            return False, None
        saved = t.flags & F.FOLD_ANY
        t.flags &= ~F.FOLD_ANY
        try:
            return True, _supported(operation, key, *args)
        finally:
            t.flags |= saved

    def lookup(self, key: bytes) -> tuple[int, bytes]:
        try:
            done, value = self._run(self.table.lookup, key)
        except TableError as exc:
            warn(exc.reason)
            return exc.status, b""
        if not done or value is None:
            return NOKEY, b""
        if self.utf8 and not is_utf8(value):
            warn(f"{self.table.spec}: key \"{show(key)}\": non-UTF-8 value \"{show(value)}\"")
            return CONFIG, b""
        return OK, value

    def update(self, key: bytes, value: bytes) -> int:
        if self.utf8 and not is_utf8(value):
            return OK  # skipped silently, as the UTF-8 layer does
        try:
            done, stored = self._run(self.table.update, key, value)
        except TableError as exc:
            warn(exc.reason)
            return exc.status
        return OK if not done or stored else NOKEY

    def delete(self, key: bytes) -> int:
        try:
            done, deleted = self._run(self.table.delete, key)
        except TableError as exc:
            warn(exc.reason)
            return exc.status
        return OK if done and deleted else NOKEY

    def sequence(self, first: bool) -> tuple[int, bytes, bytes]:
        try:
            record = _supported(self.table.sequence, first)
        except TableError as exc:
            warn(exc.reason)
            return exc.status, b"", b""
        if record is None:
            return NOKEY, b"", b""
        return OK, record[0], record[1]

    def close(self) -> None:
        self.table.close()


def _supported(operation, *args):
    try:
        return operation(*args)
    except Unsupported as exc:
        raise Fatal(exc.reason) from None


class Postmap:
    """One run of the program: configuration, flags and open connections."""

    def __init__(self, opts: Options, config, params):
        self.opts = opts
        self.config = config
        self.params = params
        self.smtputf8 = config.get_bool("smtputf8_enable")
        self.utf8 = bool(opts.utf8 and self.smtputf8)
        self.flags = dict_flags(opts, self.smtputf8)
        self.default_type = config.get("default_database_type") or "hash"
        self.clients: dict[str, ProxyClient] = {}
        self.local: list[LocalTable] = []

    def close(self) -> None:
        for table in self.local:
            try:
                table.close()
            except Exception as exc:  # closing must not hide the real outcome
                warn(f"close {table.table.spec}: {exc}")
        for client in self.clients.values():
            client.close()

    # -- opening -------------------------------------------------------------------

    def service_client(self, service: str) -> ProxyClient:
        client = self.clients.get(service)
        if client is None:
            path = service_socket_path(self.config.get("queue_directory"), service)
            client = self.clients[service] = ProxyClient(
                path, timeout=self.config.get_time("ipc_timeout"), retries=2,
                retry_delay=0.5)
        return client

    def open(self, arg: str, writable: bool, create: bool = True):
        """The table `arg` as a ProxyTable or LocalTable. A local table
        opened writable is created when missing, unless `create` is false
        (postmap -d insists on an existing table)."""
        type_name, name = table_spec(arg, self.default_type)
        if type_name == PROXY:
            service = self.config.get("proxywrite_service_name" if writable
                                      else "proxymap_service_name")
            try:
                return ProxyTable(self.service_client(service), name, self.flags,
                                  smtputf8=self.utf8, service=service)
            except ProxyRefused as exc:
                raise Fatal(str(exc)) from None
            except ProxyError as exc:
                raise Fatal(f"table {arg}: {exc}") from None
        try:
            if writable and not create:
                open_table(f"{type_name}:{name}", self.flags, False, self.params).close()
            table = open_table(f"{type_name}:{name}", self.flags, writable, self.params)
        except TableOpenError as exc:
            raise Fatal(str(exc)) from None
        self.local.append(LocalTable(table, self.utf8))
        return self.local[-1]

    def call(self, arg: str, operation, *args):
        """Run one table operation, turning refusals and transport
        failures into fatal errors."""
        try:
            return operation(*args)
        except ProxyRefused as exc:
            raise Fatal(str(exc)) from None
        except ProxyError as exc:
            raise Fatal(f"table {arg}: {exc}") from None

    # -- -q ------------------------------------------------------------------------

    def query(self, key: bytes, tables: list, write: Callable[[bytes], None]) -> bool:
        """Look `key` up in the tables in order (opening them on first use);
        write the first value found."""
        for i, arg in enumerate(self.opts.tables):
            if tables[i] is None:
                tables[i] = self.open(arg, writable=False)
            status, value = self.call(arg, tables[i].lookup, key)
            if status == OK:
                write(value)
                return True
            if status != NOKEY:
                raise Fatal(f"table {arg}: query error")
        return False

    def run_query(self) -> int:
        tables: list = [None] * len(self.opts.tables)
        out = sys.stdout.buffer
        if self.opts.key != "-":
            found = self.query(os.fsencode(self.opts.key), tables,
                               lambda value: out.write(value + b"\n"))
            out.flush()
            return 0 if found else 1
        found = False
        for line in sys.stdin.buffer:
            key = line.rstrip(b"\n")
            if self.query(key, tables, lambda value: out.write(key + b"\t" + value + b"\n")):
                found = True
        out.flush()
        return 0 if found else 1

    # -- -s ------------------------------------------------------------------------

    def run_sequence(self) -> int:
        arg = self.opts.tables[0]
        table = self.open(arg, writable=False)
        out = sys.stdout.buffer
        first = True
        while True:
            status, key, value = self.call(arg, table.sequence, first)
            first = False
            if status == NOKEY:
                break
            if status != OK:
                raise Fatal(f"table {arg}: sequence error")
            out.write(key + b"\t" + value + b"\n")
        out.flush()
        return 0

    # -- -d ------------------------------------------------------------------------

    def run_delete(self) -> int:
        if self.opts.key == "-":
            keys = [line.rstrip(b"\n") for line in sys.stdin.buffer]
        else:
            keys = [os.fsencode(self.opts.key)]
        deleted = False
        for arg in self.opts.tables:
            table = self.open(arg, writable=True, create=False)
            for key in keys:
                status = self.call(arg, table.delete, key)
                if status == OK:
                    deleted = True
                elif status != NOKEY:
                    raise Fatal(f"table {arg}: delete error")
        return 0 if deleted else 1

    # -- -i ------------------------------------------------------------------------

    def run_incremental(self) -> int:
        report = for_stdin(warn)
        for i, arg in enumerate(self.opts.tables):
            type_name, _ = table_spec(arg, self.default_type)
            if type_name == PROXY:
                raise Fatal("can't update maps in bulk via the proxy service (-i)")
            table = self.open(arg, writable=True)
            # The table must not print duplicate warnings itself: we do.
            mine = table.table.flags & (F.DUP_WARN | F.DUP_IGNORE)
            table.table.flags = (table.table.flags & ~F.DUP_WARN) | (
                F.DUP_IGNORE if mine else 0)
            # Standard input is read once: later tables get nothing, as with postmap.
            entries = read_entries(STDIN_PATH, report) if i == 0 else ()
            count = 0
            try:
                for key, value in entries:
                    if self.utf8 and not (is_utf8(key) and is_utf8(value)):
                        report(f"stdin: non-UTF-8 input \"{show(key)} {show(value)}\""
                               " -- skipping this entry")
                        continue
                    status = table.update(key, value)
                    if status == NOKEY and self.flags & F.DUP_WARN:
                        warn(f"{arg}: duplicate entry: \"{show(key)}\"")
                    elif status not in (OK, NOKEY):
                        raise Fatal(f"table {arg}: update error")
                    count += status == OK
            except OSError as exc:
                raise Fatal(f"read stdin: {exc.strerror or exc}") from None
            verbose_message(self.opts, f"{arg}: stored {count} entries")
        return 0

    # -- rebuild ---------------------------------------------------------------------

    def run_build(self) -> int:
        for arg in self.opts.tables:
            type_name, name = table_spec(arg, self.default_type)
            if type_name == PROXY:
                raise Fatal("can't create maps via the proxy service")
            try:
                cls = table_class(type_name)
            except TableOpenError as exc:
                raise Fatal(str(exc)) from None
            if not hasattr(cls, "build"):
                raise Fatal(f"unsupported dictionary type: {type_name}"
                            " does not support bulk-mode creation")
            count = self.build_one(cls, type_name, name)
            verbose_message(self.opts, f"{arg}: wrote {count} entries")
        return 0

    def build_one(self, cls, type_name: str, source: str) -> int:
        try:
            st = os.stat(source)
            with open(source, "rb"):
                pass
        except OSError as exc:
            raise Fatal(f"open {source}: {exc.strerror}") from None
        entries: Iterable = read_entries(source, warn)
        flags = self.flags
        if self.utf8:
            fold = bool(flags & F.FOLD_FIX and cls.impl_flags & F.FIXED)
            entries = utf8_entries(entries, fold, source, warn)
            flags &= ~F.FOLD_ANY
        with as_source_owner(st, self.opts.as_owner), \
                source_permissions(st, self.opts.save_perm):
            try:
                return cls.build(type_name, source, entries, flags, self.params, warn)
            except (TableOpenError, TableError) as exc:
                raise Fatal(str(getattr(exc, "reason", exc))) from None
            except OSError as exc:
                raise Fatal(f"read {source}: {exc.strerror or exc}") from None

    def run(self) -> int:
        mode = self.opts.mode
        if mode == "query":
            return self.run_query()
        if mode == "sequence":
            return self.run_sequence()
        if mode == "delete":
            return self.run_delete()
        if mode == "incremental":
            return self.run_incremental()
        return self.run_build()


@contextlib.contextmanager
def source_permissions(st: os.stat_result, save_perm: bool):
    """Like postmap: a new table file gets no more group/other access than
    its source file has (with -p, the default umask decides)."""
    if not save_perm:
        yield
        return
    old = os.umask(0o022 | (~st.st_mode & 0o077))
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def as_source_owner(st: os.stat_result, keep_root: bool):
    """Like postmap run by root: build as the owner of the source file
    (unless -o), so the table file belongs to that user."""
    if keep_root or os.geteuid() != 0 or st.st_uid == 0:
        yield
        return
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def load_config(config_dir: str):
    from proxymap.conventions.config_error import ConfigError
    from proxymap.conventions.main_cf import load_main_cf
    try:
        return load_main_cf(config_dir, warn=warn)
    except ConfigError as exc:
        raise Fatal(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    from proxymap.conventions import maillog
    from proxymap.conventions.mainconfig import ParamView
    maillog.setup(PROG, stderr=True)
    program = None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from proxymap.util.output import emit
        from proxymap import version_line
        emit(version_line(PROG))
        return 0
    try:
        opts = parse_args(argv)
        config = load_config(opts.config_dir)
        maillog.setup(PROG, stderr=True, verbose=opts.verbose)
        program = Postmap(opts, config, ParamView(config))
        return program.run()
    except Fatal as exc:
        print(f"{PROG}: fatal: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 1
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, like a C program
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:  # no tracebacks for users; still say what broke
        from proxymap.conventions.config_error import ConfigError
        if isinstance(exc, ConfigError):
            print(f"{PROG}: fatal: {exc}", file=sys.stderr, flush=True)
        else:
            print(f"{PROG}: fatal: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if program is not None:
            program.close()


if __name__ == "__main__":
    sys.exit(main())
