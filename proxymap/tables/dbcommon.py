"""What every SQL and LDAP table shares: its parameter file and templates.

Mirrors Postfix's cfg_parser and db_common: a table name that starts with
`/` or `.` is a file of `name = value` lines in main.cf syntax (comments,
continuation lines, no `$` expansion); any other name is a prefix for
main.cf parameters (`pgsql:foo` reads `foo_query`, ...). Query and
result_format templates know `%%`, `%s`, `%u`, `%d`, `%S`, `%U`, `%D` and
`%1`-`%9` with db_common's rules: a key without the parts a template needs
(no `@`, an empty local part or domain, too few domain labels) is never
sent to the server and is simply not found; `domain` restricts lookups to
keys in the listed domains; each result row is formatted with
result_format, rows are joined with commas, an empty row is skipped with
Postfix's warning, and more than expansion_limit of them is a temporary
error. The SQL tables build the legacy query from `table`, `select_field`,
`where_field` and `additional_conditions` when `query` is not set.

Ours, not Postfix's: `proxymap_cache_ttl`, `proxymap_cache_negative_ttl`
and `proxymap_cache_entries` in a table's file (or as `name_...` in
main.cf) set the answer cache of that table, overriding main.cf's
proxymap_remote_cache_ttl, proxymap_remote_cache_negative_ttl and
proxymap_answer_cache_entries (`Parameters.cache_settings`). Postfix's
cfg_parser only looks up the names it wants, so its own tables read the
same file and ignore these.

Small pure functions; only read_parameters() reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from proxymap import dictflags as F
from proxymap.conventions import maillog
from proxymap.conventions.config_error import ConfigError
from proxymap.conventions.main_cf import split_name_value
from proxymap.conventions.values import parse_int, parse_time
from proxymap.tables.base import TableError, TableOpenError
from proxymap.util.logical_lines import read_logical_lines

#: a table's own answer-cache settings (see the module text): parameter ->
#: the key of Parameters.cache_settings()
CACHE_PARAMETERS = {"proxymap_cache_ttl": "ttl", "proxymap_cache_negative_ttl": "negative_ttl",
                    "proxymap_cache_entries": "entries"}

# template needs (db_common's DB_COMMON_KEY_* and VALUE_* bits)
KEY_DOMAIN, KEY_USER, VALUE_DOMAIN, VALUE_USER = 1, 2, 4, 8


class Parameters:
    """A table's configuration: from its own file or from main.cf."""

    def __init__(self, name: str, values: dict[str, str], source: str):
        self.name = name
        self.values = values
        self.source = source   # the file, or "main.cf"

    def get(self, param: str, default: str | None = None) -> str | None:
        value = self.values.get(param)
        return default if value is None else value

    def get_str(self, param: str, default: str | None = None, min_len: int = 0) -> str | None:
        """cfg_get_str(): the value or default; "" means unset when the
        default is None; a shorter value than min_len is an error."""
        value = self.get(param, default if default is not None else "")
        if min_len and len(value) < min_len:
            raise TableOpenError(f"{self.name}: bad string length {len(value)} < {min_len}:"
                                 f" {param} = {value}")
        if default is None and value == "":
            return None
        return value

    def get_int(self, param: str, default: int, minimum: int = 0) -> int:
        text = self.get(param)
        if text is None:
            value = default
        else:
            try:
                value = int(text.strip(), 10) if text.strip() == text else int("x")
            except ValueError:
                raise TableOpenError(f"{self.name}: bad numerical configuration:"
                                     f" {param} = {text}") from None
        if minimum and value < minimum:
            raise TableOpenError(f"{self.name}: invalid {param} parameter value"
                                 f" {value} < {minimum}")
        return value

    def get_bool(self, param: str, default: bool) -> bool:
        text = self.get(param)
        if text is None:
            return default
        if text.lower() == "yes":
            return True
        if text.lower() == "no":
            return False
        raise TableOpenError(f"{self.name}: bad boolean configuration: {param} = {text}")

    def cache_settings(self) -> dict[str, int]:
        """The CACHE_PARAMETERS that are set: ttl and negative_ttl in seconds
        (main.cf's time syntax: 30, 30s, 5m), entries a count (0: no cache)."""
        settings = {}
        for param, key in CACHE_PARAMETERS.items():
            text = self.get(param)
            if text is None:
                continue
            try:
                settings[key] = parse_int(text) if key == "entries" else parse_time(text)
                if settings[key] < 0:
                    raise ValueError(text)
            except ValueError:
                kind = "numerical" if key == "entries" else "time"
                raise TableOpenError(f"{self.name}: bad {kind} configuration:"
                                     f" {param} = {text}") from None
        return settings


def parse_parameters(data: bytes, path: str) -> dict[str, str]:
    """The `name = value` pairs of a table's parameter file; the last one
    wins. A line without `=` is an error naming file and line."""
    values: dict[str, str] = {}
    for number, line in read_logical_lines(data, path, maillog.warning):
        try:
            name, value = split_name_value(line)
        except ConfigError as exc:
            raise TableOpenError(f"{path}, line {number}: {exc.reason}: \"{line}\"") from None
        if name in values and values[name] != value:
            maillog.warning(f"{path}, line {number}: overriding earlier entry:"
                            f" {name}={values[name]}")
        values[name] = value
    return values


def read_parameters(name: str, main_cf, names: Iterable[str] | None = None) -> Parameters:
    """cfg_parser_alloc(): a file when name starts with / or ., else the
    main.cf parameters `name_*` (of `names`; default PARAMETER_NAMES)."""
    if name.startswith(("/", ".")):
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise TableOpenError(f"open {name}: {exc.strerror}") from None
        return Parameters(name, parse_parameters(data, name), name)
    prefix = name + "_"
    values = {}
    for param in (*(PARAMETER_NAMES if names is None else names), *CACHE_PARAMETERS):
        value = main_cf.get(prefix + param) if main_cf is not None else None
        if value is not None:
            values[param] = value
    return Parameters(name, values, "main.cf")


#: every parameter any SQL/LDAP table reads (for main.cf-prefixed names)
PARAMETER_NAMES = (
    "dbpath", "query", "result_format", "expansion_limit", "domain", "table",
    "select_field", "where_field", "additional_conditions", "hosts", "user",
    "password", "dbname", "connect_timeout", "idle_interval", "retry_interval",
    "encoding", "select_function", "option_file", "option_group", "tls_key_file",
    "tls_cert_file", "tls_CAfile", "tls_CApath", "tls_ciphers", "tls_verify_cert",
    "require_result_set", "charset",
)


# -- templates --------------------------------------------------------------------

@dataclass
class Templates:
    """The query and result templates of one table, parsed (db_common_parse)."""

    query: str
    result_format: str
    needs: int = 0
    nparts: int = 0
    domains: list[tuple[bool, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, name: str, query: str, result_format: str, domain: str = "") -> "Templates":
        t = cls(query, result_format)
        t._scan(name, query, True)
        t._scan(name, result_format, False)
        t.domains = parse_domain_list(domain)
        return t

    def scan_query(self, name: str, template: str) -> bool:
        """Add another key-side template (LDAP's search_base); True when it
        has expansions (db_common_parse's "dynamic")."""
        return self._scan(name, template, True)

    def _scan(self, name: str, template: str, is_query: bool) -> bool:
        dynamic = False
        i = 0
        while i < len(template):
            if template[i] != "%":
                i += 1
                continue
            c = template[i + 1:i + 2]
            if c == "%" or c in ("s", "S"):
                pass
            elif c == "u":
                self.needs |= KEY_USER if is_query else VALUE_USER
            elif c == "d":
                self.needs |= KEY_DOMAIN if is_query else VALUE_DOMAIN
            elif c == "U":
                self.needs |= KEY_USER
            elif c and c in "123456789":
                self.nparts = max(self.nparts, int(c))
                self.needs |= KEY_DOMAIN
            elif c == "D":
                self.needs |= KEY_DOMAIN
            else:
                raise TableOpenError(f"db_common_parse: {name}: Invalid"
                                     f" {'query' if is_query else 'result'} template: {template}")
            dynamic = dynamic or c != "%"
            i += 2
        return dynamic

    def domain_allows(self, key: str) -> bool:
        """db_common_check_domain(): with a domain list, only keys whose
        domain is listed (and not excluded by a `!` entry) are looked up."""
        if not self.domains:
            return True
        at = key.rfind("@")
        if at <= 0:
            return False
        domain = key[at + 1:].lower()
        for negated, pattern in self.domains:
            if domain == pattern:
                return not negated
        return False

    def expand_query(self, key: str, quote: Callable[[str], str]) -> str | None:
        """The query for key, or None when the key lacks the parts the
        template needs (the lookup then finds nothing)."""
        return expand(self.query, key, None, self.needs, self.nparts, quote)

    def results(self, rows: Iterable[str | None], key: str, spec: str,
                expansion_limit: int) -> str | None:
        """Join the formatted rows; None when there are none."""
        out: list[str] = []
        for value in rows:
            if value is None:
                continue
            if value == "":
                maillog.warning(f'table "{spec}": empty lookup result for: "{key}" -- ignored')
                continue
            text = expand(self.result_format, value, key, self.needs, self.nparts, None)
            if text is None:
                continue
            out.append(text)
            if expansion_limit > 0 and len(out) > expansion_limit:
                maillog.warning(f"{spec}: Expansion limit exceeded for key '{key}'")
                raise TableError(f"{spec}: Expansion limit exceeded for key '{key}'")
        joined = ",".join(out)
        return joined or None


def parse_domain_list(text: str) -> list[tuple[bool, str]]:
    """The `domain` list: names separated by commas or blanks, `!name`
    excludes; matching ignores case. Table and file patterns are refused."""
    entries = []
    for word in text.replace(",", " ").split():
        negated = word.startswith("!")
        name = word[1:] if negated else word
        if ":" in name or name.startswith("/"):
            raise TableOpenError(f"domain = {text}: only domain names are supported"
                                 f" in this list, not {name!r}")
        entries.append((negated, name.lower()))
    return entries


def split_address(text: str) -> tuple[str | None, str | None]:
    """(local part, domain) at the last @, or (None, None) without one."""
    at = text.rfind("@")
    if at < 0:
        return None, None
    return text[:at], text[at + 1:]


def expand(template: str, value: str, key: str | None, needs: int, nparts: int,
           quote: Callable[[str], str] | None) -> str | None:
    """db_common_expand(): value is the lookup key (query) or a result row
    (result_format, then key is the lookup key). None: skip it."""
    q = quote or (lambda s: s)
    vuser, vdomain = split_address(value)
    kuser, kdomain = split_address(key) if key is not None else (vuser, vdomain)
    want_domain = VALUE_DOMAIN if key is not None else KEY_DOMAIN
    want_user = VALUE_USER if key is not None else KEY_USER
    if (needs & want_domain and not vdomain) or (needs & want_user and vuser == ""):
        return None
    if key is not None and ((needs & KEY_DOMAIN and not kdomain)
                            or (needs & KEY_USER and kuser == "")):
        maillog.warning(f"db_common_expand: lookup key '{value}' skipped after query")
        return None
    parts: list[str] = []
    if nparts:
        # labels as Postfix's argv_split() gives them: empty ones dropped
        parts = [p for p in (kdomain if key is not None else vdomain or "").split(".") if p]
        if len(parts) < nparts:
            return None
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        d = template[i + 1:i + 2]
        i += 2
        if d == "%":
            out.append("%")
        elif d == "s":
            out.append(q(value))
        elif d == "u":
            out.append(q(vuser if vdomain is not None else value))
        elif d == "d":
            out.append(q(vdomain))
        elif d == "S":
            out.append(q(key if key is not None else value))
        elif d == "U":
            if key is not None:
                out.append(q(kuser if kdomain is not None else key))
            else:
                out.append(q(vuser if vdomain is not None else value))
        elif d == "D":
            out.append(q(kdomain if key is not None else vdomain))
        else:  # 1-9, checked at parse time
            out.append(q(parts[len(parts) - int(d)]))
    return "".join(out)


def legacy_query(params: Parameters) -> str:
    """db_common_sql_build_query(): the query from table/select_field/
    where_field/additional_conditions."""
    values = {}
    for name in ("table", "select_field", "where_field"):
        value = params.get_str(name, None)
        if value is None:
            raise TableOpenError(f"db_common_sql_build_query: '{name}' parameter not defined")
        values[name] = value
    extra = params.get_str("additional_conditions", "")
    return (f"SELECT {values['select_field']} FROM {values['table']}"
            f" WHERE {values['where_field']}='%s' {extra}")


def unquoted_expansions(query: str) -> list[str]:
    """The `%x` expansions of a query outside single quotes (Postfix warns
    about them: they invite SQL injection)."""
    found = []
    in_quote = ""
    i = 0
    while i < len(query):
        c = query[i]
        if not in_quote:
            if c in "'\"":
                in_quote = c
        elif c == in_quote:
            in_quote = ""
        if in_quote != "'" and c == "%":
            nxt = query[i + 1:i + 2]
            if nxt == "%":
                i += 1
            elif nxt.isascii() and nxt.isalnum():
                found.append(query[i:i + 2])
                i += 1
        i += 1
    return found


def lookup_key(key: bytes, flags: int) -> str:
    """The key as the SQL tables see it: folded to lower case (ASCII) with
    FOLD_FIX. Postfix 3.7 sends any bytes; later releases skip keys that
    are not UTF-8 in some types: we follow 3.7."""
    if flags & F.FOLD_FIX:
        key = F.fold_ascii(key)
    return key.decode("utf-8", "surrogateescape")


def encode_value(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def sql_lookup(table, key: bytes, fetch: Callable[[str], Iterable[str | None]]) -> bytes | None:
    """The lookup every SQL table does (dict_sqlite/pgsql/mysql_lookup):
    fold the key, apply the domain filter, skip keys the query cannot use,
    then format what fetch(key) returns. `table` has `flags`, `spec`,
    `templates` and `expansion_limit`."""
    name = lookup_key(key, table.flags)
    templates = table.templates
    if not templates.domain_allows(name) or templates.expand_query(name, lambda s: s) is None:
        return None
    value = templates.results(fetch(name), name, table.spec, table.expansion_limit)
    return None if value is None else encode_value(value)
