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
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

_logger = logging.getLogger("postfix")
_state = {"tag": "proxymap", "verbose": 0, "hostname": ""}


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {127: "\\x7f"}


def escape_controls(text: str) -> str:
    """Control characters (a newline in a client-supplied table name, say)
    written as \\xNN, so that one message is always one log line."""
    return text.translate(_CONTROL)


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


def setup(tag: str, maillog_file: str = "", stderr: bool = False, verbose: int = 0) -> None:
    """Direct log lines tagged `tag` (e.g. 'postfix/proxymap') to one sink:
    stderr when asked (`--stderr`), else maillog_file when set, else syslog
    when /dev/log exists, else stderr."""
    _state["tag"] = tag
    _state["verbose"] = verbose
    for h in list(_logger.handlers):
        _logger.removeHandler(h)
        try:
            h.close()
        except OSError:
            pass   # a forked worker: the descriptor was closed with the others
    if maillog_file and not stderr:
        handler: logging.Handler = logging.FileHandler(maillog_file)
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
