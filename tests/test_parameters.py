"""The parameter declarations (proxymap/conventions/parameters.py) are the
one source of a parameter's facts: the getters follow them, every
parameter our programs read is declared with the type it is read as, and
each of our own parameters is documented."""

from __future__ import annotations

import glob
import os
import re

import pytest

from proxymap.conventions.main_cf import load_main_cf
from proxymap.conventions.parameters import (DEFAULTS, INT, LONG, OWN_PARAMETERS, PARAMETERS,
                                             TIME, declare)

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GETTER = re.compile(r"\.get_(int|time|bool|list)\(\"([a-z0-9_]+)\"")
KINDS = {"int": {INT, LONG}, "time": {TIME}, "bool": {"bool"}, "list": {"list"}}


def load(tmp_path, text: str):
    (tmp_path / "main.cf").write_text(text)
    return load_main_cf(str(tmp_path), warn=lambda m: None)


def program_sources() -> list[str]:
    """Our programs' modules that read main.cf through MainConfig (the
    table modules read their own configuration files)."""
    return sorted(glob.glob(os.path.join(TOP, "master", "*.py"))
                  + [os.path.join(TOP, "proxymap", name)
                     for name in ("server.py", "multiserver.py", "postmap.py")])


def test_every_parameter_read_is_declared_with_its_type():
    seen = 0
    for path in program_sources():
        with open(path) as f:
            for kind, name in GETTER.findall(f.read()):
                seen += 1
                assert name in PARAMETERS, f"{path}: {name} is read but not declared"
                assert PARAMETERS[name].kind in KINDS[kind], (path, name, kind)
    assert seen > 20      # the scan found the getters


def test_a_name_is_declared_once():
    with pytest.raises(ValueError, match="declared twice"):
        declare("max_use", "100")


def test_getter_of_another_type_is_a_programming_error(tmp_path):
    main = load(tmp_path, "")
    with pytest.raises(TypeError, match="ipc_timeout is declared time"):
        main.get_int("ipc_timeout")
    with pytest.raises(TypeError, match="max_use is declared int"):
        main.get_time("max_use")


def test_bounds_and_units_come_from_the_declaration(tmp_path):
    main = load(tmp_path, "ipc_timeout = 7\nin_flow_delay = 11s\nproxymap_max_bad_requests = 0\n"
                          "lmdb_map_size = 4294967296\nmax_use = 4294967296\n")
    assert PARAMETERS["ipc_timeout"].unit == "s" and main.get_time("ipc_timeout") == 7
    assert main.get_int("proxymap_max_bad_requests") == 0          # low bound 0
    assert main.get_int("lmdb_map_size") == 4294967296              # declared long
    with pytest.raises(Exception, match="bad numerical configuration: max_use"):
        main.get_int("max_use")                                    # int
    with pytest.raises(Exception, match=r"invalid in_flow_delay: 11 \(max 10\)"):
        main.get_time("in_flow_delay")


def test_views_follow_the_declarations():
    assert set(OWN_PARAMETERS) == {n for n, p in PARAMETERS.items() if p.own}
    assert all(n.startswith("proxymap_") for n in OWN_PARAMETERS)
    assert not any(PARAMETERS[n].dynamic for n in DEFAULTS)
    assert {n for n, p in PARAMETERS.items() if not p.reload} == {"queue_directory"}


@pytest.mark.parametrize("name", OWN_PARAMETERS)
def test_each_own_parameter_is_documented(name):
    docs = ""
    for path in sorted(glob.glob(os.path.join(TOP, "docs", "*.md"))):
        with open(path) as f:
            docs += f.read()
    assert name in docs
