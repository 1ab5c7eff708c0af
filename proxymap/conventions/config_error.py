"""The error every configuration reader raises: one line naming file and line.

Postfix reports a bad main.cf line as `FILE, line N: reason` and a bad
master.cf line as `FILE: line N: reason`; ConfigError carries the parts and
formats them the same way, so a reader anywhere (main.cf, master.cf, a
database table's configuration file) can raise it and a program prints it
as one `fatal:` or `error:` line.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem. str() is one line naming file and line when
    known: main.cf style `FILE, line N: reason`, master.cf style
    `FILE: line N: reason` (each as Postfix prints them)."""

    def __init__(self, reason: str, filename: str | None = None,
                 line: int | None = None, sep: str = ", line"):
        self.reason = reason
        self.filename = filename
        self.line = line
        if filename and line:
            text = f"{filename}{sep} {line}: {reason}"
        elif filename:
            text = f"{filename}: {reason}"
        else:
            text = reason
        super().__init__(text)
