"""The Postfix installed beside us: where its programs are, which version it is.

Its programs are in $command_directory (/usr/sbin by default), else on
PATH: the real postconf that `check` and `config` ask, the real postmap
the tests and benchmarks compare against.

`proxymap_postfix_version = auto` (the default) means: follow the Postfix
this site runs, whose clients speak to us. Its version is `postconf -dh
mail_version` of the real postconf ($command_directory/postconf, else the
one on PATH), asked once per process and directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from proxymap.conventions.parameters import DEFAULTS

#: seconds postconf may take
TIMEOUT = 10

_known: dict[str, str | None] = {}


def postfix_program(name: str, command_directory: str = DEFAULTS["command_directory"]
                    ) -> str | None:
    """A real Postfix program (postconf, postmap, postfix...):
    command_directory/NAME, else the one on PATH; None when there is none."""
    candidate = os.path.join(command_directory, name)
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which(name)


def installed_mail_version(command_directory: str) -> str | None:
    """mail_version of the installed Postfix, or None when there is none
    (or it does not answer)."""
    if command_directory not in _known:
        program = postfix_program("postconf", command_directory)
        version = None
        if program:
            try:
                done = subprocess.run([program, "-dh", "mail_version"], capture_output=True,
                                      text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                                      env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
                if done.returncode == 0 and done.stdout.strip():
                    version = done.stdout.strip()
            except (OSError, subprocess.SubprocessError):
                version = None
        _known[command_directory] = version
    return _known[command_directory]
