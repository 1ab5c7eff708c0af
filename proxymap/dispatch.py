"""Answering proxymap requests: access control, shared tables, statuses.

This is the request logic of Postfix's proxymap(8) without any I/O: one
`Dispatcher` per worker process keeps every table it opened in a registry
keyed by name and instance flags, shared by all clients and never closed by
a client. It checks the service's allow-list (proxy_read_maps or
proxy_write_maps), refuses writes on the read service, turns open failures
into a surrogate that answers RETRY (and is retried later instead of being
remembered forever), reopens a table whose file changed on disk, and
answers sanely where Postfix 3.7 aborts (unsupported operations -> CONFIG).
Operations of tables that may block (database clients, plugins) are handed
to the worker's Offloader and answered later (see proxymap/offload.py).
"""

from __future__ import annotations

import time

from master import maillog
from proxymap import dictflags as F
from proxymap.protocol import (BAD, CONFIG, DENY, NOKEY, OK, RETRY, SEQ_FIRST, SEQ_NEXT,
                               BadRequest, Request, encode_reply, parse_request)
from proxymap.tables import Table, TableError, TableOpenError, open_table, strip_proxy
from proxymap.utf8 import is_utf8, utf8_key

#: seconds before a table that failed to open is tried again
OPEN_RETRY_INTERVAL = 1.0

READ_SERVICE, WRITE_SERVICE = "proxymap", "proxywrite"

#: the instance bits that tell shared instances apart. Postfix keys on all
#: of INST_MASK, but real clients only ever send 0 or OPEN_LOCK there; the
#: other bits (unused ones included) would let one client make us open a
#: listed table once per value, until we run out of descriptors.
INSTANCE_KEY_BITS = F.TRY0NULL | F.TRY1NULL | F.OPEN_LOCK


class SurrogateTable(Table):
    """Stands in for a table that could not be opened: every operation
    answers RETRY with the reason, as Postfix's surrogate dictionary does."""

    impl_flags = F.PATTERN

    def __init__(self, spec: str, flags: int, reason: str):
        type_name, _, name = spec.partition(":")
        super().__init__(type_name, name, flags, False, {})
        self.reason = reason
        self.failed_at = time.monotonic()

    def _fail(self, *args):
        raise TableError(f"{self.spec} is unavailable. {self.reason}")

    lookup = update = delete = _fail

    def sequence(self, first):
        self._fail()


class Dispatcher:
    """Turns decoded requests into encoded replies for one service role."""

    def __init__(self, service: str, allowed: set[str], params, *, smtputf8: bool = True,
                 opener=open_table, offload=None):
        self.service = service
        self.writable = service == WRITE_SERVICE
        self.allowed = allowed
        self.params = params
        self.smtputf8 = smtputf8
        self.opener = opener
        #: runs blocking tables' operations off the loop; None: inline
        self.offload = offload
        self.tables: dict[tuple[str, int], Table] = {}
        self.param_name = "proxy_write_maps" if self.writable else "proxy_read_maps"

    # -- the request entry point ------------------------------------------------

    def handle(self, attrs: list[tuple[bytes, bytes]]):
        """One decoded attribute list in, one encoded reply out, or an
        offload.Pending whose reply comes later. Never raises."""
        try:
            req = parse_request(attrs)
        except BadRequest as exc:
            maillog.warning(f"{self.service}: bad request: {exc.reason}")
            return encode_reply(exc.name, BAD, exc.layout)
        try:
            return self._answer(req)
        except Exception as exc:  # a bug must not cost the client its answer
            maillog.error(f"{req.name} {req.table}: unexpected {type(exc).__name__}: {exc}")
            return encode_reply(req.name, RETRY, req.layout)

    def _answer(self, req: Request) -> bytes:
        name = req.name
        if name in ("update", "delete") and not self.writable:
            maillog.warning(f"refusing {req.table} {name} request on non-{WRITE_SERVICE} service")
            return encode_reply(name, DENY, req.layout)
        spec = strip_proxy(req.table)
        if ":" not in spec or spec.startswith(":"):
            maillog.warning(f"malformed table name {req.table!r}: need type:name")
            return encode_reply(name, BAD, req.layout)
        if spec not in self.allowed:
            maillog.warning(f'request for unapproved table: "{spec}"')
            maillog.warning(f"to approve this table for {'read-write' if self.writable else 'read-only'}"
                            f" access, list proxy:{spec} in {self.param_name}")
            return encode_reply(name, DENY, req.layout)
        table = self.find_table(spec, req)
        if name == "open":
            return encode_reply(name, OK, req.layout, flags=table.flags)
        if req.layout == 311:
            table.flags = (req.flags & ~F.IMPL_MASK) | (table.flags & (F.IMPL_MASK | F.TRY0NULL | F.TRY1NULL))
        else:
            table.flags = (table.flags & ~F.RQST_MASK) | (req.flags & F.RQST_MASK)
        if name == "update":
            table.flags |= F.SYNC_UPDATE | F.DUP_REPLACE
        elif name == "delete":
            table.flags |= F.SYNC_UPDATE
        if name == "sequence" and req.function not in (SEQ_FIRST, SEQ_NEXT):
            maillog.warning(f"{spec}: unknown sequence function {req.function}")
            return encode_reply(name, BAD, req.layout)
        if table.blocking and self.offload is not None:
            return self.offload.submit(table, table.flags, lambda: self._operate(table, req),
                                       encode_reply(name, RETRY, req.layout))
        return self._operate(table, req)

    def _operate(self, table: Table, req: Request) -> bytes:
        name, layout = req.name, req.layout
        utf8 = self.smtputf8 and getattr(table, "utf8_layer", False)
        key = req.key
        try:
            if utf8 and name != "sequence":
                key = utf8_key(key, bool(table.flags & F.FOLD_FIX and table.flags & F.FIXED))
                if key is None:  # Postfix's UTF-8 layer: not found / not done
                    return encode_reply(name, NOKEY if name == "lookup" else OK, layout,
                                        flags=table.flags)
            if name == "lookup":
                value = table.lookup(key)
                if value is None:
                    return encode_reply(name, NOKEY, layout, flags=table.flags)
                if utf8 and not is_utf8(value):
                    return encode_reply(name, CONFIG, layout, flags=0)
                return encode_reply(name, OK, layout, flags=table.flags, value=value)
            if name == "update":
                done = table.update(key, req.value)
            elif name == "delete":
                done = table.delete(key)
            else:
                record = table.sequence(req.function == SEQ_FIRST)
                if record is None:
                    return encode_reply(name, NOKEY, layout, flags=table.flags)
                return encode_reply(name, OK, layout, flags=table.flags,
                                    key=record[0], value=record[1])
            return encode_reply(name, OK if done else NOKEY, layout, flags=table.flags)
        except TableError as exc:
            maillog.warning(exc.reason)
            return encode_reply(name, exc.status, layout)

    # -- the shared table registry ----------------------------------------------

    def find_table(self, spec: str, req: Request) -> Table:
        """The shared instance for (spec, instance flags), opened on first use,
        reopened when its file changed or when a failed open may now work."""
        inst = req.instance_flags if req.layout == 311 else req.flags & F.INST_MASK
        inst &= INSTANCE_KEY_BITS
        regkey = (spec, inst)
        table = self.tables.get(regkey)
        if table is not None:
            if isinstance(table, SurrogateTable):
                if time.monotonic() - table.failed_at < OPEN_RETRY_INTERVAL:
                    return table
            elif not table.changed():
                return table
            elif table.modified():      # one line per change, not per unsettled reopen
                maillog.info(f"table {spec}: has changed -- reopening")
            self._close(table)
        # OPEN_LOCK holds an exclusive lock for the life of the instance: a
        # reader has no business with it, and a client of the read service
        # could otherwise freeze every writer of a listed file for good.
        flags = req.flags if self.writable else req.flags & ~F.OPEN_LOCK
        table = self._open(spec, flags)
        self.tables[regkey] = table
        return table

    def _open(self, spec: str, flags: int) -> Table:
        try:
            table = self.opener(spec, flags, self.writable, self.params)
        except TableOpenError as exc:
            maillog.error(f"open table {spec}: {exc}")
            return SurrogateTable(spec, flags, str(exc))
        except Exception as exc:
            maillog.error(f"open table {spec}: {type(exc).__name__}: {exc}")
            return SurrogateTable(spec, flags, str(exc))
        table.utf8_layer = bool(flags & F.UTF8_REQUEST)
        if table.utf8_layer and self.smtputf8:
            table.flags |= F.UTF8_ACTIVE
        return table

    def _close(self, table: Table) -> None:
        if table.blocking and self.offload is not None:
            self.offload.retire(table)   # after the operations it still has
            return
        try:
            table.close()
        except Exception as exc:
            maillog.warning(f"close table {table.spec}: {exc}")

    def close_all(self) -> None:
        for table in self.tables.values():
            self._close(table)
        self.tables.clear()
        if self.offload is not None:
            self.offload.close()

