"""Command output to a reader that may go away (`status --json | head -1`).

A C program such as postconf(1) is killed by SIGPIPE when its reader
exits, so the shell sees nothing but the lines already read. Python turns
that into BrokenPipeError; here a closed stdout ends the output quietly,
no `fatal: Broken pipe` line, and the command keeps the exit status it
would have had for the output already written.
"""

from __future__ import annotations

import os
import sys


def emit(text: str) -> bool:
    """Write `text` and a newline to stdout and flush; False (and stdout
    pointed at /dev/null, so the interpreter's final flush is quiet too)
    when the reader has gone."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        discard_stdout()
        return False


def discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null: whatever is still buffered is
    dropped instead of failing again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
