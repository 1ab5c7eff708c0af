"""The import contracts of setup.cfg hold, and they catch a wrong-way import.

docs/architecture.md draws the layers: master/ on top, then the proxymap
programs, the worker skeleton, the tables, the codec, the Postfix-wide
conventions (proxymap/conventions/) and the generic mechanisms
(proxymap/util/) at the bottom; proxymap/ never imports master/.
import-linter's `lint-imports` checks every import, also those inside
functions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(directory: str) -> subprocess.CompletedProcess:
    """lint-imports on the setup.cfg in `directory`, importing the packages
    found there (PYTHONPATH first, ahead of the editable install)."""
    assert os.path.exists(LINT), f"{LINT} missing: `make deps` installs import-linter (test extra)"
    env = dict(os.environ, PYTHONPATH=directory)
    return subprocess.run([LINT, "--no-cache", os.path.join(directory, "setup.cfg")],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_are_kept():
    done = lint(TOP)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def copy_tree(tmp_path) -> str:
    copy = tmp_path / "tree"
    for package in ("proxymap", "master"):
        shutil.copytree(os.path.join(TOP, package), copy / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(TOP, "setup.cfg"), copy / "setup.cfg")
    return str(copy)


def add_import(path: str, line: str) -> None:
    with open(path) as f:
        text = f.read()
    marker = "from __future__ import annotations\n"
    assert marker in text
    with open(path, "w") as f:
        f.write(text.replace(marker, marker + line + "\n", 1))


@pytest.mark.parametrize("module, line, verdict, report", [
    # a table importing the supervisor: wrong way across the packages and the layers
    ("proxymap/tables/texthash.py", "import master.pidfile",
     "0 kept, 2 broken", "proxymap.tables.texthash -> master.pidfile"),
    # the conventions importing a table
    ("proxymap/conventions/values.py", "from proxymap.tables import source",
     "1 kept, 1 broken", "proxymap.conventions.values -> proxymap.tables"),
    # a generic mechanism importing maillog
    ("proxymap/util/fdlimit.py", "from proxymap.conventions import maillog",
     "1 kept, 1 broken", "proxymap.util.fdlimit -> proxymap.conventions"),
])
def test_a_wrong_way_import_is_caught(tmp_path, module, line, verdict, report):
    copy = copy_tree(tmp_path)
    add_import(os.path.join(copy, *module.split("/")), line)
    done = lint(copy)
    assert done.returncode != 0
    assert verdict in done.stdout
    assert report in done.stdout
