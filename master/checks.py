"""What `proxymap-master check` reports beyond syntax, as postconf(1) does.

Postfix's postconf warns about parameters no program reads
(`/etc/postfix/main.cf: unused parameter: max_idel=5s`) and
postmap/proxymap name table types they cannot open (`unsupported
dictionary type: TYPE`, with Debian's `Is the postfix-TYPE package
installed?` for the types it ships as packages). This module finds, for
the configuration the master would run:

* unused parameters in main.cf and in the services' `-o` options: the
  names real postconf calls unused (it knows every Postfix parameter, the
  ones a master.cf service defines and the ones referenced as $name), less
  our own parameters, plus `-o` names of our service file that neither
  Postfix nor we know;
* unknown table types and missing or unreadable table files in
  proxy_read_maps / proxy_write_maps, and every rule of their cidr:,
  regexp: and pcre: tables that a worker would skip (Postfix's warnings);
* master.cf fields the master does not act on (chroot, wakeup) and
  unpriv = n (workers then keep root privileges).

Everything here only produces warning texts; `check` keeps its exit status.
"""

from __future__ import annotations

import os
import pwd
import re
import selectors
import stat
import subprocess
import time

from master.master_cf import Service
from proxymap.allowlist import proxy_allow_set
from proxymap.conventions.expansion import referenced_names
from proxymap.conventions.mainconfig import MainConfig
from proxymap.conventions.parameters import OWN_PARAMETERS
from proxymap.conventions.installed_postfix import postfix_program
from proxymap.tables import TABLE_TYPES, plugin_types, table_class
from proxymap.tables.base import TableOpenError

#: table types whose rule files `check` compiles
PATTERN_TYPES = frozenset({"cidr", "regexp", "pcre"})
#: table types Debian ships as postfix-TYPE packages (dynamicmaps.cf)
PACKAGED_TYPES = frozenset({"cdb", "ldap", "lmdb", "mysql", "pcre", "pgsql", "sqlite"})

#: the file a table type opens for `type:name` (what each table module opens)
TABLE_FILES = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb",
               "texthash": "", "cidr": "", "regexp": "", "pcre": ""}

#: seconds one postconf run may take
POSTCONF_TIMEOUT = 30.0

_UNUSED = re.compile(r"^\S*postconf: warning: (.*): unused parameter: ([^=\s]+)=(.*)$")


def postconf_program(main: MainConfig) -> str | None:
    """Real postconf(1): $command_directory/postconf, else on PATH."""
    return postfix_program("postconf", main.get("command_directory"))


def run_postconf(main: MainConfig, option: str) -> tuple[str, str] | None:
    """(stdout, stderr) of `postconf -c DIR OPTION`. Postfix programs write
    their warnings to stderr only when it is a terminal (else to syslog), so
    stderr is a pseudo-terminal here."""
    program = postconf_program(main)
    if program is None:
        return None
    controller, terminal = os.openpty()
    try:
        try:
            proc = subprocess.Popen([program, "-c", main.config_directory, option],
                                    stdout=subprocess.PIPE, stderr=terminal,
                                    stdin=subprocess.DEVNULL)
        except OSError:
            return None
        os.close(terminal)
        terminal = -1
        errors = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(controller, selectors.EVENT_READ)
            out = bytearray()
            deadline = time.monotonic() + POSTCONF_TIMEOUT
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except OSError:         # EIO: postconf closed the terminal
                        chunk = b""
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.fd == controller:
                        errors += chunk
                    else:
                        out += chunk
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        return out.decode(errors="replace"), errors.decode(errors="replace").replace("\r", "")
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


class PostconfReport:
    """What real postconf says about a configuration directory: the
    parameters it calls unused (file, name, value) and every name it knows."""

    def __init__(self, unused: list[tuple[str, str, str]], known: set[str]):
        self.unused = unused
        self.known = known

    @classmethod
    def of(cls, main: MainConfig) -> "PostconfReport | None":
        """None when there is no postconf to ask."""
        listing = run_postconf(main, "-n")
        defaults = run_postconf(main, "-d")
        if listing is None or defaults is None:
            return None
        unused = [m.groups() for m in map(_UNUSED.match, listing[1].splitlines()) if m]
        known = {line.partition(" = ")[0].strip() for line in defaults[0].splitlines()}
        return cls(unused, known)


def unused_parameters(main: MainConfig, services: list[Service],
                      postconf: PostconfReport | None) -> list[str]:
    """`FILE: unused parameter: name=value` texts in postconf's wording:
    postconf's own verdict on main.cf (less our parameters), or without
    postconf the names of our namespace nothing here reads; then the
    services' -o names that neither Postfix nor this project knows."""
    own = set(OWN_PARAMETERS)
    explicit = main.explicit()
    messages: list[str] = []
    if postconf is None:
        for name in main.unused():
            if name.startswith(("proxymap_", "proxywrite_")) and name not in own:
                messages.append(f"{main.path}: unused parameter: {name}={explicit[name]}")
        known = set(main.defaults())
    else:
        for path, name, value in postconf.unused:
            if name not in own:
                messages.append(f"{path}: unused parameter: {name}={value}")
        known = postconf.known | set(main.defaults())
    for value in list(explicit.values()) + [value for service in services
                                            for value in service.overrides.values()]:
        known.update(referenced_names(value))
    known |= set(explicit)
    for service in services:
        for name, value in service.overrides.items():
            text = f"{service.filename}: unused parameter: {name}={value}"
            if name not in known and text not in messages:
                messages.append(text)
    return messages


def table_problem(spec: str, owner: str | None, created: bool = False) -> str | None:
    """Why `type:name` cannot be served (type unknown, file missing or not
    readable by `owner`), or None. With `created` (a proxy_write_maps
    table: proxywrite creates a missing file, as verify's cache on a new
    site), a missing file is fine while its directory exists."""
    type_name, _, name = spec.partition(":")
    if type_name not in TABLE_TYPES and type_name not in plugin_types():
        hint = (f". Is the postfix-{type_name} package installed?"
                if type_name in PACKAGED_TYPES else "")
        return f"unsupported dictionary type: {type_name}{hint}"
    try:
        table_class(type_name)
    except TableOpenError as exc:
        return str(exc)
    suffix = TABLE_FILES.get(type_name)
    if suffix is None or not name.startswith("/"):
        return None
    path = name + suffix
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        if created and os.path.isdir(os.path.dirname(path)):
            return None
        return f"open {path}: {exc.strerror}"
    except OSError as exc:
        return f"open {path}: {exc.strerror}"
    if owner is not None and not readable_by(st, owner):
        return f"open {path}: Permission denied (for user {owner})"
    return None


def readable_by(st: os.stat_result, user: str) -> bool:
    """Whether the permission bits of `st` let `user` read the file (root
    reads anything; a check run as root judges for the workers' account)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return True
    if pw.pw_uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == pw.pw_uid:
        return bool(mode & stat.S_IRUSR)
    groups = set(os.getgrouplist(user, pw.pw_gid))
    if st.st_gid in groups:
        return bool(mode & stat.S_IRGRP)
    return bool(mode & stat.S_IROTH)


def table_problems(cfg: MainConfig, owner: str | None) -> list[str]:
    """One text per table of proxy_read_maps/proxy_write_maps that a worker
    could not serve."""
    messages = []
    try:
        written = proxy_allow_set(cfg.get("proxy_write_maps"))
    except Exception:           # noqa: BLE001 - syntax errors are check's own job
        written = set()
    for parameter in ("proxy_read_maps", "proxy_write_maps"):
        try:
            tables = sorted(proxy_allow_set(cfg.get(parameter)))
        except Exception:       # noqa: BLE001 - syntax errors are check's own job
            continue
        where = cfg.locate(parameter, "").filename or cfg.path
        for spec in tables:
            problem = table_problem(spec, owner, created=spec in written)
            if problem:
                messages.append(f"{where}: {parameter}: table {spec}: {problem}")
            else:
                messages += skipped_rules(spec)
    return messages


def skipped_rules(spec: str) -> list[str]:
    """For a cidr:, regexp: or pcre: table: the warnings a worker would log
    when opening it (each rule it would skip, IFs without ENDIF, ...), so
    `check` shows them before a reload makes the file live."""
    type_name, _, name = spec.partition(":")
    if type_name not in PATTERN_TYPES:
        return []
    from proxymap.tables.patterns import rule_file_warnings
    try:
        return rule_file_warnings(type_name, name)
    except OSError:
        return []


def ignored_fields(service: Service) -> list[str]:
    """master.cf fields of a proxymap service that the master does not act on."""
    where = f"{service.filename}: line {service.line}: service {service.name}/{service.type}"
    messages = []
    if service.chroot:
        messages.append(f"{where}: chroot = y is ignored (workers do not chroot)")
    if service.wakeup:
        messages.append(f"{where}: wakeup = {service.wakeup} is ignored")
    if not service.unpriv:
        messages.append(f"{where}: unpriv = n: workers keep root privileges")
    return messages


def configuration_warnings(config) -> list[str]:
    """Every warning text for a loaded supervisor Configuration."""
    main = config.main
    owner = config.owner.user if config.owner else None
    messages = unused_parameters(main, config.services, PostconfReport.of(main))
    seen = set()
    for service in config.services:
        messages += ignored_fields(service)
        for text in table_problems(main.with_overrides(service.overrides), owner):
            if text not in seen:
                seen.add(text)
                messages.append(text)
    return messages
