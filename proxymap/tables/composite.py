"""`unionmap:{t1, t2, ...}` and `pipemap:{t1, t2, ...}`: tables of tables.

Mirrors Postfix 3.7's dict_union and dict_pipe. The name is one `{...}`
group listing member tables separated by commas/blanks (a member's own
braces are kept, as in `inline:{a=b}`); a `proxy:` prefix on a member is
dropped because we already are the proxy. Members are opened with the
composite's flags; the composite takes the implementation flags (FIXED or
PATTERN) of its first member and folds the key with them before handing it
on, and each member gets the composite's request bits before every call.

* union: the key goes to every member; the values found are joined with
  "," (an empty value still adds its comma when something came before);
  "not found" when nothing non-empty was collected; a member's error
  aborts the lookup with that error.
* pipe: the key goes to the first member, its value to the next, and so
  on; the last value is the answer; a miss or an error ends the chain.

Only lookup is supported; opening for writing fails (Postfix: requires
O_RDONLY). The composite counts as changed when any member changed.
"""

from __future__ import annotations

from proxymap import dictflags as F
from proxymap.tables import open_table, strip_proxy
from proxymap.tables.base import Table, TableOpenError
from proxymap.tables.inline import BraceError, split_braced, strip_braces

def member_specs(name: str) -> list[str]:
    """The member `type:name` strings of a composite name `{a, b}`, with
    leading `proxy:` prefixes removed; ValueError on bad syntax."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw.startswith(b"{") or not raw.endswith(b"}"):
        raise ValueError("bad syntax")
    try:
        body = strip_braces(raw)
    except BraceError:
        raise ValueError("bad syntax") from None
    members = []
    for token in split_braced(body):
        members.append(strip_proxy(token.decode("utf-8", "surrogateescape")))
    if not members:
        raise ValueError("bad syntax")
    return members


class CompositeTable(Table):
    """Opens the members and keeps their flags in step with ours."""

    @classmethod
    def member_specs(cls, name: str) -> list[str]:
        try:
            return member_specs(name)
        except ValueError:
            return []

    def __init__(self, type_name, name, flags, writable, params):
        if writable:
            raise TableOpenError(f"{type_name}:{name} map requires O_RDONLY access mode")
        try:
            specs = member_specs(name)
        except ValueError as exc:
            raise TableOpenError(f'{exc}: "{type_name}:{name}"; need "{type_name}:{{type:name...}}"') from None
        self.members: list[Table] = []
        try:
            for spec in specs:
                self.members.append(open_table(spec, flags, writable, params))
        except Exception:  # close what was opened, then report the failure
            self.close()
            raise
        self.impl_flags = self.members[0].impl_flags & (F.FIXED | F.PATTERN)
        super().__init__(type_name, name, flags, writable, params)

    def _prepare(self, key: bytes) -> bytes:
        """Pass our request bits to every member; fold the key our way."""
        bits = self.flags & F.RQST_MASK
        for member in self.members:
            member.flags = (member.flags & ~F.RQST_MASK) | bits
        return self.fold(key)

    def changed(self) -> bool:
        return any(member.changed() for member in self.members)

    def close(self) -> None:
        members, self.members = self.members, []
        for member in members:
            member.close()


class UnionTable(CompositeTable):
    """unionmap:{...} -- every member's answer, joined with commas."""

    def lookup(self, key: bytes) -> bytes | None:
        key = self._prepare(key)
        result = b""
        for member in self.members:
            value = member.lookup(key)
            if value is not None:
                if result:
                    result += b","
                result += value
        return result or None


class PipeTable(CompositeTable):
    """pipemap:{...} -- each member's answer is the next member's key."""

    def lookup(self, key: bytes) -> bytes | None:
        value = self._prepare(key)
        for member in self.members:
            value = member.lookup(value)
            if value is None:
                return None
        return value
