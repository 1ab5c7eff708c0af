"""Postfix-style logging: `postfix/proxymap[1234]: warning: text`.

Postfix programs log `<syslog_name>/<program>[pid]: <severity>: text`
(severity omitted for info). We log to syslog when /dev/log exists,
otherwise to stderr, or to `maillog_file` when main.cf sets it. `fatal`
logs and exits 1, like msg_fatal().

Lines written to `maillog_file` carry a time stamp and the host name field,
the first label of $myhostname, as Postfix's own log writer puts them:
`Dec 01 18:57:06 mx postfix/proxymap[1234]: text`. Callers reopen the file
by calling setup() again (the master on reload, workers on SIGHUP), so a
rotated log is let go of by every process.

`maillog_file` is checked and opened as Postfix's maillog client and
postlogd do: its name must start with one of `maillog_file_prefixes`, and
it is opened without following a symlink (except a root-owned one in a
root-only directory, such as /dev/stdout), refused when it has other hard
links, is not a regular file or belongs to someone else. Every message is
one line whatever bytes it holds: control characters and bytes that are
not UTF-8 are written as \\xNN.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys

_logger = logging.getLogger("postfix")
_state = {"tag": "proxymap", "verbose": 0, "hostname": ""}


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {127: "\\x7f"}
# Bytes that are not UTF-8 reach us as the surrogates of surrogateescape
# (a table name is decoded that way); any other lone surrogate cannot be
# written either. Both become text, or a line would be lost to an
# encoding error.
_CONTROL |= {c: f"\\x{c - 0xdc00:02x}" for c in range(0xdc80, 0xdd00)}
_CONTROL |= {c: f"\\u{c:04x}" for c in range(0xd800, 0xe000) if c not in _CONTROL}


def escape_controls(text: str) -> str:
    """Control characters (a newline in a client-supplied table name, say)
    written as \\xNN, so that one message is always one log line; bytes
    that were not UTF-8 likewise."""
    return text.translate(_CONTROL)


class LogFileError(Exception):
    """maillog_file cannot be used; str() is the one-line reason."""


def check_prefixes(path: str, prefixes: str) -> None:
    """Postfix's rule: maillog_file must start with one of the comma- or
    blank-separated maillog_file_prefixes (a plain string prefix)."""
    if not any(path.startswith(p) for p in prefixes.replace(",", " ").split()):
        raise LogFileError(f"maillog_file value '{path}' does not match any prefix in "
                           f"maillog_file_prefixes")


def _root_symlink_ok(path: str, link: os.stat_result) -> bool:
    """A symlink is accepted only if root owns it and its directory is
    root's and writable by nobody else (postlogd's exception for
    /dev/stdout and friends)."""
    if link.st_uid != 0:
        return False
    try:
        parent = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return False
    return parent.st_uid == 0 and not parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def open_log_file(path: str) -> int:
    """Open `path` for appending, created mode 0600 when missing, without
    ever writing through an attacker's link; returns the descriptor or
    raises LogFileError `open logfile 'PATH': reason` (Postfix's wording).

    As Postfix's safe_open(): an existing file is opened without O_CREAT
    and then compared with lstat() of the name; a missing one is created
    with O_EXCL, which does not follow a symlink either. O_NONBLOCK at open
    keeps a FIFO without a reader from hanging us."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

    def refuse(why: str):
        raise LogFileError(f"open logfile '{path}': {why}")

    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            refuse(f"cannot create file exclusively: {exc.strerror}")
        os.set_blocking(fd, True)
        return fd
    except OSError as exc:
        refuse(f"cannot open file: {exc.strerror}")
    try:
        st = os.fstat(fd)
        why = None
        if st.st_nlink != 1:
            why = f"file has {st.st_nlink} hard links"
        elif stat.S_ISDIR(st.st_mode):
            why = "file is a directory"
        else:
            try:
                link = os.lstat(path)
            except OSError as exc:
                link, why = None, f"file status changed unexpectedly: {exc.strerror}"
            if link is None:
                pass
            elif stat.S_ISLNK(link.st_mode):
                if not _root_symlink_ok(path, link):
                    why = "file is a symbolic link"
            elif (link.st_dev, link.st_ino, link.st_nlink, link.st_mode) != \
                    (st.st_dev, st.st_ino, st.st_nlink, st.st_mode):
                why = "file status changed unexpectedly"
            elif not stat.S_ISREG(st.st_mode):
                why = "file is not a regular file"
            elif st.st_uid not in (0, os.geteuid()):
                why = f"file is owned by uid {st.st_uid}"
        if why:
            refuse(why)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_log_file(path: str, prefixes: str) -> None:
    """Everything setup() checks about maillog_file, opening nothing that
    stays open (for `check` and reload); raises LogFileError."""
    if not path:
        return
    check_prefixes(path, prefixes)
    os.close(open_log_file(path))


class _Formatter(logging.Formatter):
    LEVELS = {logging.DEBUG: "", logging.INFO: "", logging.WARNING: "warning: ",
              logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}

    def __init__(self, with_time: bool):
        super().__init__()
        self.with_time = with_time

    def format(self, record):
        prefix = f"{_state['tag']}[{os.getpid()}]: {self.LEVELS.get(record.levelno, '')}"
        text = prefix + escape_controls(record.getMessage())
        if self.with_time:
            host = _state["hostname"]
            text = self.formatTime(record, "%b %d %H:%M:%S") + " " + \
                (f"{host} " if host else "") + text
        return text


def setup(tag: str, maillog_file: str = "", stderr: bool = False, verbose: int = 0,
          prefixes: str = "/var, /dev/stdout") -> None:
    """Direct log lines tagged `tag` (e.g. 'postfix/proxymap') to one sink:
    stderr when asked (`--stderr`), else maillog_file when set, else syslog
    when /dev/log exists, else stderr. A maillog_file that breaks the rules
    above raises LogFileError, and the sink in use stays."""
    file_stream = None
    if maillog_file and not stderr:
        check_prefixes(maillog_file, prefixes)
        file_stream = os.fdopen(open_log_file(maillog_file), "a", encoding="utf-8",
                                errors="backslashreplace")
    _state["tag"] = tag
    _state["verbose"] = verbose
    for h in list(_logger.handlers):
        _logger.removeHandler(h)
        try:
            h.close()
        except OSError:
            pass   # a forked worker: the descriptor was closed with the others
    if file_stream is not None:
        handler: logging.Handler = _LogFileHandler(file_stream)
        handler.setFormatter(_Formatter(with_time=True))
    elif not stderr and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log",
                                                 facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(_Formatter(with_time=False))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(with_time=False))
    _logger.addHandler(handler)
    _logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    _logger.propagate = False


class _LogFileHandler(logging.StreamHandler):
    """Lines appended to an already opened maillog_file stream (closed with
    the handler, unlike a plain StreamHandler's)."""

    def close(self):
        try:
            self.stream.close()
        finally:
            super().close()


def log_file_descriptor() -> int | None:
    """The descriptor of the maillog_file in use, None when logging
    elsewhere (the master passes it to its workers on reload)."""
    for handler in _logger.handlers:
        if isinstance(handler, (logging.FileHandler, _LogFileHandler)):
            stream = handler.stream
            if stream is not None and not stream.closed:
                return stream.fileno()
    return None


def adopt_log_file(fd: int) -> None:
    """Log to the open maillog_file `fd` from now on (a worker that has
    dropped privileges cannot reopen a root-owned file; its master opens
    the new file and passes it over)."""
    stream = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
    handler = _LogFileHandler(stream)
    handler.setFormatter(_Formatter(with_time=True))
    for old in list(_logger.handlers):
        _logger.removeHandler(old)
        try:
            old.close()
        except OSError:
            pass
    _logger.addHandler(handler)


def set_hostname(myhostname: str) -> None:
    """The host name field of maillog_file lines: the first label of
    $myhostname, as Postfix writes it."""
    _state["hostname"] = myhostname.split(".", 1)[0]


def lines_lost(maillog_file: str) -> bool:
    """Whether a detached process (no stderr) would log into nothing: no
    maillog_file and no syslog socket."""
    return not maillog_file and not os.path.exists("/dev/log")


def info(msg: str) -> None:
    _logger.info(msg)


def debug(msg: str) -> None:
    if _state["verbose"]:
        _logger.debug(msg)


def warning(msg: str) -> None:
    _logger.warning(msg)


def error(msg: str) -> None:
    _logger.error(msg)


def fatal(msg: str, status: int = 1):
    _logger.critical(msg)
    for h in _logger.handlers:
        h.flush()
    sys.exit(status)


if not _logger.handlers:
    setup("proxymap", stderr=True)
