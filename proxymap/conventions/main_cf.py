"""Reading main.cf: `name = value` lines, the last one winning.

As Postfix's mail_conf_read(): logical lines (comments, whitespace
continuation), `name = value` with blanks around both removed, a later
assignment overriding an earlier one with Postfix's warning. A file
modified during the last second is read again (Postfix's hot-file rule,
shared with master.cf). Only read_settled() and load_main_cf() touch the
file system.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping

from proxymap.conventions import maillog
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.mainconfig import MainConfig
from proxymap.conventions.parameters import PARAMETERS
from proxymap.util.logical_lines import BLANKS, read_logical_lines

#: the environment variable that names the configuration directory
#: (Postfix's CONF_ENV_PATH); the master sets it for its children
CONFIG_DIR_ENV = "MAIL_CONFIG"


def default_config_dir(environ: Mapping[str, str] = os.environ) -> str:
    """The configuration directory of a program run without -c:
    $MAIL_CONFIG, else config_directory's default (/etc/postfix)."""
    return environ.get(CONFIG_DIR_ENV, PARAMETERS["config_directory"].default)


def split_name_value(line: str) -> tuple[str, str]:
    """`name = value` -> (name, value) with blanks around both removed.
    Raises ConfigError(reason) without location."""
    text = line.strip(BLANKS)
    end = 0
    while end < len(text) and text[end] not in BLANKS and text[end] != "=":
        end += 1
    name = text[:end]
    rest = text[end:].lstrip(BLANKS)
    if not rest.startswith("="):
        raise ConfigError(f"missing '=' after attribute name: \"{text}\"")
    if not name:
        raise ConfigError("missing attribute name")
    return name, rest[1:].strip(BLANKS)


def parse_main_cf(data: bytes, path: str, warn: Callable[[str], None]
                  ) -> dict[str, tuple[str, int]]:
    """name -> (raw value, line number); the last assignment wins."""
    entries: dict[str, tuple[str, int]] = {}
    for number, line in read_logical_lines(data, path, warn):
        try:
            name, value = split_name_value(line)
        except ConfigError as exc:
            raise ConfigError(exc.reason, path, number) from None
        if name in entries:
            warn(f"{path}, line {number}: overriding earlier entry: {name}={entries[name][0]}")
            del entries[name]  # keep file order of the surviving entry
        entries[name] = (value, number)
    return entries



def read_settled(path: str, settle: bool = False, attempts: int = 20,
                 pause: float = 0.3) -> bytes:
    """Read a whole file. With `settle`, follow Postfix's hot-file rule: while
    the file's mtime lies between (start of read - 1 s) and the end of the
    read, wait `pause` and read again (at most `attempts` reads).
    Raises ConfigError when the file cannot be read."""
    for _ in range(attempts):
        started = time.time()
        try:
            with open(path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except OSError as exc:
            raise ConfigError(f"open {path}: {exc.strerror}") from None
        if not settle or not started - 1 <= mtime <= time.time():
            break
        time.sleep(pause)
    return data


def load_main_cf(config_dir: str, overrides: Mapping[str, str] | None = None,
                 warn: Callable[[str], None] | None = None,
                 settle: bool = False) -> MainConfig:
    """Read config_dir/main.cf. Syntax errors and a missing file raise
    ConfigError; warnings go to `warn` (default: maillog.warning)
    and are kept in MainConfig.warnings. `settle` applies Postfix's
    hot-file rule (re-read a file modified during the last second)."""
    config_dir = os.path.abspath(config_dir)
    path = os.path.join(config_dir, "main.cf")
    collected: list[str] = []

    def note(message: str) -> None:
        collected.append(message)
        if warn is not None:
            warn(message)
        else:
            maillog.warning(message)

    data = read_settled(path, settle)
    entries = parse_main_cf(data, path, note)
    return MainConfig(config_dir, path, entries, overrides, collected)
