"""`unix:passwd.byname` and `unix:group.byname`: the system user database.

Mirrors Postfix 3.7's dict_unix. A lookup (key folded with FOLD_FIX) calls
getpwnam()/getgrnam() and answers the entry in /etc/passwd resp. /etc/group
notation: `name:passwd:uid:gid:gecos:dir:shell` and
`name:passwd:gid:member,member` (nothing after the last colon when the
group lists no members). Any other unix: name fails to open
("unknown table"). Only lookup is supported.
"""

from __future__ import annotations

import grp
import os
import pwd

from proxymap.tables.base import Table, TableOpenError


def passwd_entry(name: str) -> str | None:
    try:
        pw = pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None
    return (f"{pw.pw_name}:{pw.pw_passwd}:{pw.pw_uid}:{pw.pw_gid}:"
            f"{pw.pw_gecos}:{pw.pw_dir}:{pw.pw_shell}")


def group_entry(name: str) -> str | None:
    try:
        gr = grp.getgrnam(name)
    except (KeyError, ValueError):
        return None
    return f"{gr.gr_name}:{gr.gr_passwd}:{gr.gr_gid}:{','.join(gr.gr_mem)}"


MAPS = {"passwd.byname": passwd_entry, "group.byname": group_entry}


class UnixTable(Table):
    """unix:passwd.byname / unix:group.byname."""

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        self.getter = MAPS.get(name)
        if self.getter is None:
            raise TableOpenError(f"unknown table: {self.spec}")

    def lookup(self, key: bytes) -> bytes | None:
        key = self.fold(key)
        if not key:
            return None
        entry = self.getter(os.fsdecode(key))
        return None if entry is None else os.fsencode(entry)
