"""The benchmark's lookup tables, identical for both servers.

Builds, with the real postmap, a large `hash:` and `btree:` table
(Postfix's indexed Berkeley DB maps), plus a `cidr:` and a `regexp:` table
of realistic size, and the key streams the clients send: mostly hits with
some misses, drawn from a seeded generator so every run and both servers
see the same sequence.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
from dataclasses import dataclass, field

from proxymap.conventions.installed_postfix import postfix_program

POSTMAP = postfix_program("postmap")


def address(i: int) -> str:
    return f"user{i:06d}@example{i % 500}.org"


def mailbox(i: int) -> str:
    return f"mailbox{i}@dest{i % 37}.example"


def cidr_rule(n: int) -> tuple[str, str]:
    """Rule n of the cidr table: a distinct /24 in 10.0.0.0/8 (n < 65536)
    and its verdict; a key of rule n is found after scanning n rules."""
    return f"10.{n // 256}.{n % 256}.0/24", f"REJECT rule{n}"


def regexp_rule(n: int) -> tuple[str, str]:
    """Rule n of the regexp table: all addresses of one example domain
    whose user number ends in a given digit pair."""
    return rf"/^user[0-9]{{4}}{n % 100:02d}@example{n // 100 + 7}\.org$/", f"OK regexp{n}"


def pcre_rule(n: int) -> tuple[str, str]:
    """Rule n of the pcre table: the regexp rule in PCRE syntax, with a
    capture in the result."""
    return rf"/^(user\d{{4}}){n % 100:02d}@example{n // 100 + 7}\.org$/", f"OK pcre{n} $1"


@dataclass
class TableSet:
    """Where the tables are and what keys to ask for."""

    root: str
    entries: int
    cidr_rules: int
    regexp_rules: int
    hash: str = ""
    btree: str = ""
    cidr: str = ""
    regexp: str = ""
    pcre: str = ""
    specs: dict = field(default_factory=dict)

    def lookup_keys(self, kind: str, count: int, seed: int = 1, miss: float = 0.1) -> list[bytes]:
        """`count` keys for table kind: hits with a `miss` share of misses."""
        rng = random.Random(f"{kind}-{seed}")
        keys = []
        for _ in range(count):
            hit = rng.random() >= miss
            if kind in ("hash", "btree"):
                i = rng.randrange(self.entries) if hit else self.entries + rng.randrange(10 ** 6)
                keys.append(address(i).encode())
            elif kind == "cidr":
                if hit:
                    n = rng.randrange(self.cidr_rules)
                    net = cidr_rule(n)[0].split("/")[0].rsplit(".", 1)[0]
                    keys.append(f"{net}.{rng.randrange(1, 255)}".encode())
                else:
                    keys.append(f"192.0.2.{rng.randrange(1, 255)}".encode())
            elif kind in ("regexp", "pcre"):
                if hit:
                    n = rng.randrange(self.regexp_rules)
                    keys.append(f"user{rng.randrange(10 ** 4):04d}{n % 100:02d}"
                                f"@example{n // 100 + 7}.org".encode())
                else:
                    keys.append(address(rng.randrange(10 ** 6)).replace("example", "other")
                                .encode())
            else:
                raise ValueError(f"unknown table kind {kind!r}")
        return keys


def build(root: str, entries: int, cidr_rules: int, regexp_rules: int,
          config_dir: str, owner: str = "postfix") -> TableSet:
    """Write the sources and index them with real postmap (-c config_dir)."""
    os.makedirs(root, exist_ok=True)
    ts = TableSet(root, entries, cidr_rules, regexp_rules)
    big = os.path.join(root, "big")
    with open(big, "w") as f:
        f.writelines(f"{address(i)} {mailbox(i)}\n" for i in range(entries))
    ts.hash = f"hash:{big}"
    btree_src = os.path.join(root, "bigtree")
    shutil.copyfile(big, btree_src)
    ts.btree = f"btree:{btree_src}"
    for spec in (ts.hash, ts.btree):
        subprocess.run([POSTMAP, "-c", config_dir, spec], check=True, capture_output=True,
                       timeout=600)
    cidr = os.path.join(root, "clients.cidr")
    with open(cidr, "w") as f:
        f.writelines("%s %s\n" % cidr_rule(n) for n in range(cidr_rules))
    ts.cidr = f"cidr:{cidr}"
    regexp = os.path.join(root, "senders.regexp")
    with open(regexp, "w") as f:
        f.writelines("%s %s\n" % regexp_rule(n) for n in range(regexp_rules))
    ts.regexp = f"regexp:{regexp}"
    pcre = os.path.join(root, "senders.pcre")
    with open(pcre, "w") as f:
        f.writelines("%s %s\n" % pcre_rule(n) for n in range(regexp_rules))
    ts.pcre = f"pcre:{pcre}"
    ts.specs = {"hash": ts.hash, "btree": ts.btree, "cidr": ts.cidr, "regexp": ts.regexp,
                "pcre": ts.pcre}
    chown_tree(root, owner)
    return ts


def copy_btree(ts: TableSet, dest_dir: str, name: str, owner: str = "postfix") -> str:
    """A private writable copy of the big btree table; returns its spec."""
    os.makedirs(dest_dir, exist_ok=True)
    base = os.path.join(dest_dir, name)
    src = ts.btree.split(":", 1)[1]
    shutil.copyfile(src, base)
    shutil.copyfile(src + ".db", base + ".db")
    chown_tree(dest_dir, owner)
    return f"btree:{base}"


def chown_tree(path: str, owner: str) -> None:
    """Give path and everything below it to owner (when running as root)."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(owner)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(top, name), pw.pw_uid, pw.pw_gid)
