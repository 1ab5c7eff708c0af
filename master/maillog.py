"""Postfix-style logging: `postfix/proxymap[1234]: warning: text`.

Postfix programs log `<syslog_name>/<program>[pid]: <severity>: text`
(severity omitted for info). We log to syslog when /dev/log exists,
otherwise to stderr, or to `maillog_file` when main.cf sets it. `fatal`
logs and exits 1, like msg_fatal().
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

_logger = logging.getLogger("postfix")
_state = {"tag": "proxymap", "verbose": 0}


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
            text = self.formatTime(record, "%b %d %H:%M:%S") + " " + text
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
