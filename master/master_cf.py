"""master.cf, read the way Postfix 3.7's master reads it.

One service per logical line with the eight classic columns and their
`-` defaults, command arguments with `{ ... }` grouping, and the
`-o name=value` / `-o { name = value }` per-service overrides;
master_service_disable; duplicate entries (an error for our own service
file, Postfix's warning and last-one-wins otherwise). Parsing is done by
small pure functions; only load_master_cf() touches the file system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from proxymap.conventions import maillog
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.main_cf import read_settled
from proxymap.conventions.mainconfig import MainConfig
from proxymap.conventions.service_sockets import service_socket_path, socket_class
from proxymap.conventions.values import find_close, split_grouped, strip_group
from proxymap.util.logical_lines import BLANKS, read_logical_lines


def _master_error(path: str, line: int, reason: str) -> ConfigError:
    return ConfigError(reason, path, line, sep=": line")


SERVICE_TYPES = ("unix", "unix-dgram", "inet", "fifo", "pass")
LOCAL_TYPES = ("unix", "unix-dgram", "fifo", "pass")


@dataclass
class Service:
    """One master.cf entry with `-` defaults resolved."""
    name: str
    type: str
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: int
    maxproc: int          # 0 = unlimited
    command: str
    args: list[str]       # argv after the command; `{..}` groups unwrapped
    overrides: dict[str, str]  # from -o, later ones win
    filename: str
    line: int
    wakeup_if_used: bool = False  # wakeup written as `N?`

    def socket_path(self, main: MainConfig) -> str:
        """$queue_directory/private/NAME or .../public/NAME; for inet the
        service name itself (an address)."""
        if self.type == "inet":
            return self.name
        return service_socket_path(main.get("queue_directory"), self.name, self.private)

    def identity(self) -> tuple[str, str]:
        """The master's notion of 'same service': canonical name and type."""
        if self.type in LOCAL_TYPES:
            return (f"{socket_class(self.private)}/{self.name}", self.type)
        return (self.name, self.type)


def split_command_args(text: str) -> list[str]:
    """Blank-separated tokens, a `{...}` group being part of its token
    (values.split_grouped, as for a list value); a token that starts with
    `{` must be that one group, and is unwrapped (outer braces and blanks
    just inside removed), as Postfix's extpar does. Raises
    ConfigError(reason)."""
    tokens = []
    for token in split_grouped(text, BLANKS):
        if token.startswith("{"):
            if find_close(token, 0, "{", "}") != len(token) - 1:
                raise ConfigError(f"syntax error after '}}' in \"{token}\"")
            token = strip_group(token)
        tokens.append(token)
    return tokens


def parse_overrides(args: list[str]) -> dict[str, str]:
    """name -> value of every `-o name=value` (also `-oname=value`) in args;
    blanks around name and value are trimmed. Raises ConfigError(reason)."""
    result: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":
            if i + 1 >= len(args):
                raise ConfigError("option -o requires a name=value argument")
            setting = args[i + 1]
            i += 2
        elif arg.startswith("-o") and len(arg) > 2:
            setting = arg[2:]
            i += 1
        else:
            i += 1
            continue
        name, eq, value = setting.partition("=")
        name = name.strip(BLANKS)
        if not eq or not name or any(c in BLANKS or c in "{}" for c in name):
            raise ConfigError(f"malformed -o option: \"{setting}\" (expected name=value)")
        result[name] = value.strip(BLANKS)
    return result


def _flag(path: str, line: int, field_name: str, value: str, default: bool) -> bool:
    if value == "-":
        return default
    if value in ("y", "n"):
        return value == "y"
    raise _master_error(path, line, f"field \"{field_name}\": bad value: \"{value}\"")


_FIELDS = ("service name", "transport type", "private", "unprivileged", "chroot",
           "wakeup_time", "max_proc", "command")


def parse_master_line(text: str, path: str, line: int, default_process_limit: int,
                      compat_level: tuple[int, int, int],
                      warn: Callable[[str], None]) -> Service:
    """One logical master.cf line -> Service, or ConfigError naming file:line."""
    try:
        tokens = split_command_args(text)
    except ConfigError as exc:
        raise _master_error(path, line, exc.reason) from None
    for index, field_name in enumerate(_FIELDS):
        if index >= len(tokens):
            raise _master_error(path, line, f"missing \"{field_name}\" field")
    name, stype, private, unpriv, chroot, wakeup, maxproc, command = tokens[:8]
    for value, field_name in ((name, "service name"), (stype, "transport type"),
                              (command, "command")):
        if value == "-":
            raise _master_error(path, line, f"field \"{field_name}\" has no default value")
    if stype not in SERVICE_TYPES:
        raise _master_error(path, line, f"bad transport type: {stype}")
    is_private = _flag(path, line, "private", private, True)
    if stype == "inet" and is_private:
        raise _master_error(path, line, "inet service cannot be private")
    is_unpriv = _flag(path, line, "unprivileged", unpriv, True)
    if chroot == "-" and compat_level < (1, 0, 0):
        warn(f"{path}: line {line}: using backwards-compatible default setting chroot=y")
    is_chroot = _flag(path, line, "chroot", chroot, compat_level < (1, 0, 0))
    wake, conditional = 0, False
    if wakeup != "-":
        match = re.fullmatch(r"([0-9]+)(\??)", wakeup)
        if not match:
            raise _master_error(path, line, f"field \"wakeup_time\": bad value: \"{wakeup}\"")
        wake, conditional = int(match.group(1)), bool(match.group(2))
    if maxproc == "-":
        procs = default_process_limit
    elif maxproc.isdigit() and maxproc.isascii():
        procs = int(maxproc)
    else:
        raise _master_error(path, line, f"field \"max_proc\": bad value: \"{maxproc}\"")
    args = tokens[8:]
    try:
        overrides = parse_overrides(args)
    except ConfigError as exc:
        raise _master_error(path, line, exc.reason) from None
    return Service(name=name, type=stype, private=is_private, unpriv=is_unpriv,
                   chroot=is_chroot, wakeup=wake, maxproc=procs, command=command,
                   args=args, overrides=overrides, filename=path, line=line,
                   wakeup_if_used=conditional)


def service_disabled(service: Service, patterns: list[str]) -> bool:
    """master_service_disable: `type` or `name/type` (old `name.type`)
    patterns, `!` negates, first match wins, case-insensitive."""
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.lower()
        candidates = (service.type.lower(), f"{service.name}/{service.type}".lower(),
                      f"{service.name}.{service.type}".lower())
        if pattern in candidates:
            return not negate
    return False


def parse_master_cf(data: bytes, path: str, main: MainConfig,
                    warn: Callable[[str], None], strict_duplicates: bool = True
                    ) -> list[Service]:
    """All entries of a master.cf text. A duplicate (name, type) is an error
    when strict_duplicates, else Postfix's warning and the last entry wins."""
    limit = main.get_int("default_process_limit")
    level = main.compatibility_level()
    services: dict[tuple[str, str], Service] = {}
    for number, text in read_logical_lines(data, path, warn):
        service = parse_master_line(text, path, number, limit, level, warn)
        key = service.identity()
        if key in services:
            if strict_duplicates:
                first = services[key]
                raise _master_error(path, number,
                                    f"duplicate master.cf entry for service \"{service.name}\""
                                    f" ({key[0]}) type {service.type}, first at line {first.line}")
            warn(f"duplicate master.cf entry for service \"{service.name}\" ({key[0]})"
                 f" -- using the last entry")
            del services[key]
        services[key] = service
    return list(services.values())


def load_master_cf(config_dir: str, main: MainConfig,
                   warn: Callable[[str], None] | None = None,
                   strict_duplicates: bool = True,
                   apply_disable: bool = True, settle: bool = False,
                   path: str | None = None) -> list[Service]:
    """Read config_dir/master.cf, or `path` (relative to config_dir) when
    given. Entries matched by master_service_disable are left out when
    apply_disable (as the master does); `settle` as for load_main_cf()."""
    path = os.path.join(os.path.abspath(config_dir), path or "master.cf")
    if warn is None:
        warn = maillog.warning
    data = read_settled(path, settle)
    services = parse_master_cf(data, path, main, warn, strict_duplicates)
    if apply_disable:
        patterns = main.get_list("master_service_disable")
        services = [s for s in services if not service_disabled(s, patterns)]
    return services
