"""`ldap:/etc/postfix/file.cf`: lookups in an LDAP directory.

Mirrors Postfix's dict_ldap (ldap_table(5)), as Debian's Postfix 3.7
builds it:
- `server_host`: hosts or LDAP URLs (`ldap://`, `ldaps://`, `ldapi://`),
  separated by commas or blanks; a bare host gets `server_port` (389)
  unless it has `:port`; the first one that accepts a connection is used,
  in the order written (libldap's URL list, no random order and no down
  time, unlike the SQL clients of failover.py).
- `search_base` and `query_filter` (default `(mailacceptinggeneralid=%s)`)
  with db_common's `%s %u %d %S %U %D %1-%9` (dbcommon.py); the key is
  escaped RFC 2254-style in the filter (`*()\\` as `\\XX`) and RFC
  2253-style in the base; a base with expansions that names no entry
  means "not found", a fixed one is a temporary error.
- `result_attribute` (default maildrop), `special_result_attribute`
  (DN or LDAP URL values are searched in turn, up to `recursion_limit`
  levels), `terminal_result_attribute` (an entry that has one yields only
  those), `leaf_result_attribute` (only from entries without special
  values); values are formatted with `result_format` and joined with
  commas; more than `expansion_limit` values, more than `size_limit`
  entries in one search (default expansion_limit) or a failed nested
  search is a temporary error; a DN that is not there is skipped with
  Postfix's warning.
- `scope` (sub, one, base), `bind` (yes/simple, no/none; sasl is not
  supported), `bind_dn`, `bind_pw`, `version` (3; 2 is sent as asked,
  and slapd 2.5 refuses it), `dereference` (0-3), `chase_referrals`,
  `timeout` (connect, bind and search, 10 s), `domain`, `start_tls`,
  `tls_require_cert`, `tls_ca_cert_file`, `tls_ca_cert_dir`, `tls_cert`,
  `tls_key`, `tls_cipher_suite`; `cache*` are ignored with Postfix's
  warning, `debuglevel`, `tls_random_file` are read and not used.
- A key that is not UTF-8 is not looked up (unless SMTPUTF8 is active),
  FOLD_FIX folds it to lower case, and a search that finds the server
  gone reconnects once before the lookup is a temporary error (RETRY).
The quirks of the C loop are kept on purpose: whether an entry is
terminal or a leaf carries over to the next entry of the same search
result when the next one has none of those attributes.

Uses ldap3 (pure Python, well kept) on a bounded pool of connections per
table and worker (connpool.py) instead of Postfix's one connection per
process; a connection the server dropped empties the pool's idle ones.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass, field

from proxymap.conventions import maillog
from proxymap import dictflags as F
from proxymap.tables.backend import BackendTable
from proxymap.tables.base import TableError, TableOpenError
from proxymap.tables.connpool import Pool
from proxymap.tables.dbcommon import Templates, encode_value, expand, lookup_key, read_parameters
from proxymap.tables.failover import Dropped, HostFailed
from proxymap.utf8 import is_utf8

try:
    import ldap3
    from ldap3.core import exceptions as ldap_errors
except ImportError as exc:   # reported when an ldap: table is opened
    ldap3 = None
    _IMPORT_ERROR = str(exc)

LDAP_PORT, LDAPS_PORT = 389, 636
#: where libldap looks for slapd's socket when an ldapi:// URL names none (Debian)
DEFAULT_LDAPI = "/var/run/slapd/ldapi"

#: result codes, as libldap numbers them (negative ones are the client's own)
SUCCESS, SIZELIMIT_EXCEEDED, NO_SUCH_OBJECT = 0, 4, 32
SERVER_DOWN, TIMEOUT, FILTER_ERROR, CONNECT_ERROR = -1, -5, -7, -11

#: libldap's ldap_err2string() for the codes a lookup meets (logged in its words)
ERROR_TEXT = {
    0: "Success", 1: "Operations error", 2: "Protocol error", 3: "Time limit exceeded",
    4: "Size limit exceeded", 10: "Referral", 32: "No such object",
    34: "Invalid DN syntax", 48: "Inappropriate authentication", 49: "Invalid credentials",
    50: "Insufficient access", 51: "Server is busy", 52: "Server is unavailable",
    53: "Server is unwilling to perform", 80: "Other (e.g., implementation specific) error",
    -1: "Can't contact LDAP server", -5: "Timed out", -7: "Bad search filter",
    -11: "Connect error",
}

#: every parameter an ldap: table reads (for main.cf-prefixed names)
PARAMETER_NAMES = (
    "server_host", "server_port", "search_base", "timeout", "query_filter", "result_format",
    "result_filter", "domain", "terminal_result_attribute", "leaf_result_attribute",
    "result_attribute", "special_result_attribute", "scope", "bind", "bind_dn", "bind_pw",
    "cache", "cache_expiry", "cache_size", "recursion_limit", "expansion_limit",
    "size_limit", "dereference", "chase_referrals", "version", "start_tls",
    "tls_require_cert", "tls_ca_cert_file", "tls_ca_cert_dir", "tls_cert", "tls_key",
    "tls_random_file", "tls_cipher_suite", "debuglevel",
)

BIND_NONE, BIND_SIMPLE = 0, 1
BIND_CODES = {"no": BIND_NONE, "none": BIND_NONE, "yes": BIND_SIMPLE, "simple": BIND_SIMPLE}


# -- pure functions ----------------------------------------------------------------

def _hex_escape(text: str, special: str) -> str:
    out = []
    for c in text:
        if c in special:
            out.append("".join(f"\\{b:02X}" for b in c.encode()))
        else:
            out.append(c)
    return "".join(out)


def filter_quote(text: str) -> str:
    """The key in a search filter: `*`, `(`, `)` and `\\` as `\\XX` (RFC 2254)."""
    return _hex_escape(text, "*()\\")


def dn_quote(text: str) -> str:
    """The key in a search base: blanks and `"#+,;<>\\` as `\\XX` (RFC 2253)."""
    return _hex_escape(text, " \t\"#+,;<>\\")


def error_text(code: int, fallback: str = "") -> str:
    return ERROR_TEXT.get(code) or fallback or f"Unknown error {code}"


def strip_url_wrapping(text: str) -> str:
    """libldap accepts `<URL>` and `URL:URL` around an LDAP URL."""
    if text.startswith("<"):
        text = text[1:].removesuffix(">")
    if text[:4].lower() == "url:":
        text = text[4:]
    return text


def is_ldap_url(text: str) -> bool:
    """ldap_is_ldap_url(): ldap://, ldaps:// or ldapi://, any case."""
    return strip_url_wrapping(text).lower().startswith(("ldap://", "ldaps://", "ldapi://"))


def server_urls(server_host: str, port: int) -> list[str]:
    """The URL list dict_ldap_open() gives libldap: URLs as written, a
    bare `host` as ldap://host:server_port, `host:port` as ldap://host:port."""
    urls = []
    for word in server_host.replace(",", " ").split():
        if is_ldap_url(word):
            urls.append(word)
        elif ":" in word:
            urls.append(f"ldap://{word}")
        else:
            urls.append(f"ldap://{word}:{port}")
    return urls


@dataclass
class ServerAddress:
    """Where one server URL points: a host and port, or a UNIX socket."""

    url: str
    scheme: str              # ldap, ldaps or ldapi
    host: str = ""
    port: int = 0
    socket_path: str = ""


def parse_server_url(url: str) -> ServerAddress:
    """An `ldap[s|i]://hostport/...` URL -> its address; ValueError when bad."""
    text = strip_url_wrapping(url)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("ldap", "ldaps", "ldapi"):
        raise ValueError("Bad LDAP URL")
    hostport = rest.split("/", 1)[0].split("?", 1)[0]
    if scheme == "ldapi":
        return ServerAddress(url, scheme, socket_path=urllib.parse.unquote(hostport)
                             or DEFAULT_LDAPI)
    default = LDAPS_PORT if scheme == "ldaps" else LDAP_PORT
    if hostport.startswith("["):
        host, bracket, tail = hostport[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("Bad LDAP URL")
        port_text = tail[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError("Bad LDAP URL")
    return ServerAddress(url, scheme, urllib.parse.unquote(host) or "localhost",
                         int(port_text) if port_text else default)


SCOPE_NAMES = {"base": "BASE", "one": "LEVEL", "sub": "SUBTREE"}


@dataclass
class SearchUrl:
    """An LDAP URL value of a special result attribute (RFC 4516)."""

    base: str
    attributes: list[str] = field(default_factory=list)
    scope: str = "base"
    filter: str = "(objectClass=*)"


def parse_search_url(text: str) -> SearchUrl:
    """ldap_url_parse() for what a lookup uses: dn?attrs?scope?filter;
    each part percent-decoded; ValueError when malformed."""
    body = strip_url_wrapping(text)
    _, sep, rest = body.partition("://")
    if not sep:
        raise ValueError("Bad LDAP URL")
    _, slash, path = rest.partition("/")
    if not slash:
        return SearchUrl("")
    parts = path.split("?")
    if len(parts) > 5:
        raise ValueError("Bad LDAP URL")
    dn = urllib.parse.unquote(parts[0])
    attrs = [urllib.parse.unquote(a) for a in parts[1].split(",") if a] if len(parts) > 1 else []
    scope = parts[2].lower() if len(parts) > 2 and parts[2] else "base"
    if scope not in SCOPE_NAMES:
        raise ValueError("Bad LDAP URL")
    filt = urllib.parse.unquote(parts[3]) if len(parts) > 3 and parts[3] else "(objectClass=*)"
    return SearchUrl(dn, attrs, scope, filt)


def attrdesc_subtype(a1: str, a2: str) -> int:
    """1 when a2 is a1 or one of its options (`a1;lang-en`), -1 when a1 is
    an option of a2, 0 when they are different attributes (names ignore case)."""
    l1, l2 = a1.lower(), a2.lower()
    if l2 == l1 or l2.startswith(l1 + ";"):
        return 1
    if l1.startswith(l2 + ";"):
        return -1
    return 0


def url_attrs(url_attributes: list[str], result_attributes: list[str]) -> list[str] | None:
    """The attributes to ask for with an LDAP URL: ours when it names none,
    else those both name (the more specific spelling); None: nothing to ask."""
    if not url_attributes:
        return list(result_attributes)
    wanted = []
    for a1 in url_attributes:
        for a2 in result_attributes:
            relation = attrdesc_subtype(a1, a2)
            if relation > 0:
                wanted.append(a2)
            elif relation < 0:
                wanted.append(a1)
    return wanted or None


def search_filter(text: str) -> str:
    """libldap wraps a filter that lacks its outer parentheses."""
    stripped = text.strip()
    return stripped if stripped.startswith("(") else f"({stripped})"


def values_of(attributes: list[tuple[str, list[bytes]]], name: str) -> list[bytes] | None:
    """ldap_get_values_len(): the values of exactly that attribute (any
    case), None when the entry has no such attribute."""
    for attr, values in attributes:
        if attr.lower() == name.lower():
            return values
    return None


# -- the table -------------------------------------------------------------------------

class SearchFailed(TableError):
    """A search error that also tears the connection down (Postfix does)."""


class StartTlsFailed(HostFailed):
    """STARTTLS refused: Postfix logs it as an error, not a warning."""


@dataclass
class Expansion:
    """The state of one lookup across nested searches."""

    values: list[str] = field(default_factory=list)
    count: int = 0
    failed: bool = False


class LdapTable(BackendTable):
    impl_flags = F.FIXED

    def __init__(self, type_name, name, flags, writable, params):
        super().__init__(type_name, name, flags, writable, params)
        if writable:
            raise TableOpenError(f"{type_name}:{name} map requires O_RDONLY access mode")
        if ldap3 is None:
            raise TableOpenError(f"dictionary type ldap needs ldap3: {_IMPORT_ERROR}")
        cf = read_parameters(name, params, PARAMETER_NAMES)
        self.cache_settings = cf.cache_settings()
        self.parser_name = name
        here = f"dict_ldap_open: {name}"
        server_host = cf.get_str("server_host", "localhost", min_len=1)
        port = cf.get_int("server_port", LDAP_PORT)
        version = cf.get_int("version", 3, minimum=2)
        if version not in (2, 3):
            maillog.warning(f"{here} Unknown version {version}, using 3.")
            version = 3
        self.urls = server_urls(server_host, port)
        self.servers: list[ServerAddress] = []
        for url in self.urls:
            try:
                address = parse_server_url(url)
            except ValueError as exc:
                maillog.error(f"dict_ldap_open: error parsing URL {url}: -9: {exc}; skipping")
                continue
            if address.scheme != "ldap" and version != 3:
                maillog.warning(f"dict_ldap_open: URL scheme {address.scheme} requires"
                                f" protocol version 3")
                version = 3
            self.servers.append(address)
        self.server_host = " ".join(a.url for a in self.servers)
        scope = cf.get_str("scope", "sub", min_len=1)
        if scope.lower() not in SCOPE_NAMES:
            maillog.warning(f"{here}: Unrecognized value {scope} specified for scope; using sub")
            scope = "sub"
        self.scope = getattr(ldap3, SCOPE_NAMES[scope.lower()])
        self.search_base = cf.get_str("search_base", "")
        self.ldap_timeout = cf.get_int("timeout", 10)
        self.io_timeout = self.ldap_timeout or None
        query = cf.get_str("query_filter", "(mailacceptinggeneralid=%s)")
        result_format = cf.get_str("result_format", None)
        if result_format is None:
            result_format = cf.get_str("result_filter", "%s", min_len=1)
        self.templates = Templates.parse(name, query, result_format, cf.get_str("domain", ""))
        self.dynamic_base = self.templates.scan_query(name, self.search_base)
        if not self.templates.scan_query(name, query):
            maillog.warning(f"{here}: Fixed query_filter {query} is probably useless")
        # order matters: terminal, leaf, ordinary, then special attributes
        self.attributes: list[str] = []
        for param, default in (("terminal_result_attribute", ""), ("leaf_result_attribute", ""),
                               ("result_attribute", "maildrop"),
                               ("special_result_attribute", "")):
            self.attributes += cf.get_str(param, default).replace(",", " ").split()
            if param == "terminal_result_attribute":
                self.num_terminal = len(self.attributes)
            elif param == "leaf_result_attribute":
                self.num_leaf = len(self.attributes) - self.num_terminal
            elif param == "result_attribute":
                self.num_attributes = len(self.attributes)
        bind = cf.get_str("bind", "yes", min_len=1)
        if bind.lower() not in BIND_CODES:
            raise TableOpenError(f"{name}: unsupported parameter value: bind = {bind}")
        self.bind = BIND_CODES[bind.lower()]
        self.bind_dn = cf.get_str("bind_dn", "")
        self.bind_pw = cf.get_str("bind_pw", "")
        if cf.get_bool("cache", False):
            maillog.warning(f"dict_ldap_open: {name} ignoring cache")
        for param in ("cache_expiry", "cache_size"):
            if cf.get_int(param, -1) >= 0:
                maillog.warning(f"dict_ldap_open: {name} ignoring {param}")
        self.recursion_limit = cf.get_int("recursion_limit", 1000, minimum=1)
        self.expansion_limit = cf.get_int("expansion_limit", 0)
        self.size_limit = cf.get_int("size_limit", self.expansion_limit)
        dereference = cf.get_int("dereference", 0)
        if not 0 <= dereference <= 3:
            maillog.warning(f"dict_ldap_open: {name} Unrecognized value {dereference}"
                            f" specified for dereference; using 0")
            dereference = 0
        self.dereference = (ldap3.DEREF_NEVER, ldap3.DEREF_SEARCH, ldap3.DEREF_BASE,
                            ldap3.DEREF_ALWAYS)[dereference]
        self.chase_referrals = cf.get_bool("chase_referrals", False)
        self.start_tls = cf.get_bool("start_tls", False)
        if self.start_tls and version < 3:
            maillog.warning(f"dict_ldap_open: {name} start_tls requires protocol version 3")
            version = 3
        self.version = version
        self.tls = None
        if self.start_tls or any(a.scheme == "ldaps" for a in self.servers):
            self.tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED if cf.get_bool("tls_require_cert", False)
                else ssl.CERT_NONE,
                ca_certs_file=cf.get_str("tls_ca_cert_file", None),
                ca_certs_path=cf.get_str("tls_ca_cert_dir", None),
                local_certificate_file=cf.get_str("tls_cert", None),
                local_private_key_file=cf.get_str("tls_key", None),
                ciphers=cf.get_str("tls_cipher_suite", None))
        cf.get_int("debuglevel", 0)
        size = int((params or {}).get("proxymap_backend_threads", 0) or 4)
        self.lane_size = size
        self.pool = Pool(f"ldap {self.server_host}", self._connect, _unbind, size, 60.0)
        if name.startswith(("/", ".")):
            self.remember_file(name)

    # -- connections ---------------------------------------------------------------

    def _bind_dn_for_log(self) -> str:
        return self.bind_dn or "empty or implicit"

    def _connect(self):
        """dict_ldap_connect(): the first server that accepts a connection,
        STARTTLS and the bind when configured. Failures raise HostFailed
        after Postfix's warning."""
        conn = None
        for address in self.servers:
            if address.scheme == "ldapi":
                server = ldap3.Server(f"ldapi://{urllib.parse.quote(address.socket_path, '')}",
                                      get_info=ldap3.NONE, connect_timeout=self.io_timeout)
            else:
                server = ldap3.Server(address.host, port=address.port,
                                      use_ssl=address.scheme == "ldaps", tls=self.tls,
                                      get_info=ldap3.NONE, connect_timeout=self.io_timeout)
            candidate = ldap3.Connection(
                server, version=self.version, authentication=ldap3.ANONYMOUS,
                auto_referrals=self.chase_referrals, raise_exceptions=False, read_only=True,
                receive_timeout=self.io_timeout, check_names=False,
                return_empty_attributes=False, auto_range=False)
            try:
                candidate.open(read_server_info=False)
            except ldap_errors.LDAPException:
                continue
            conn = candidate
            break
        if conn is None:
            code = SERVER_DOWN
            if self.bind == BIND_NONE:
                raise HostFailed(f"dict_ldap_lookup: Search error {code}: {error_text(code)}")
            raise HostFailed(f"dict_ldap_connect: Unable to bind to server {self.server_host}"
                             f" with dn {self._bind_dn_for_log()}: {code} ({error_text(code)})")
        try:
            if self.start_tls:
                try:
                    ok = conn.start_tls(read_server_info=False)
                except ldap_errors.LDAPException as exc:
                    ok, conn.result = False, {"result": CONNECT_ERROR, "description": str(exc)}
                if not ok:
                    code = (conn.result or {}).get("result", CONNECT_ERROR)
                    raise StartTlsFailed(f"dict_ldap_connect: Unable to set STARTTLS: {code}:"
                                     f" {error_text(code, (conn.result or {}).get('description'))}")
            if self.bind != BIND_NONE:
                self._bind(conn)
        except BaseException:
            _unbind(conn)
            raise
        return conn

    def _bind(self, conn) -> None:
        if bool(self.bind_dn) != bool(self.bind_pw):
            raise HostFailed(f"dict_ldap_connect: Unable to bind to server {self.server_host}"
                             f" with dn {self._bind_dn_for_log()}: bind_dn and bind_pw must"
                             f" both be set or both be empty")
        if self.bind_dn:
            conn.authentication = ldap3.SIMPLE
            conn.user, conn.password = self.bind_dn, self.bind_pw
        try:
            ok = conn.bind(read_server_info=False)
            code = (conn.result or {}).get("result", 0) if not ok else 0
            description = (conn.result or {}).get("description", "")
        except ldap_errors.LDAPCommunicationError:
            ok, code, description = False, SERVER_DOWN, ""
        except ldap_errors.LDAPException as exc:
            ok, code, description = False, CONNECT_ERROR, str(exc)
        if not ok:
            raise HostFailed(f"dict_ldap_connect: Unable to bind to server {self.server_host}"
                             f" with dn {self._bind_dn_for_log()}: {code}"
                             f" ({error_text(code, description)})")

    def _search(self, conn, base: str, scope, filt: str, attributes: list[str]):
        """search_st(): (result code, [(dn, [(attribute, values)])])."""
        try:
            conn.search(base, search_filter(filt), scope, dereference_aliases=self.dereference,
                        attributes=attributes or [ldap3.ALL_ATTRIBUTES],
                        size_limit=self.size_limit, time_limit=self.ldap_timeout)
        except ldap_errors.LDAPInvalidFilterError:
            return FILTER_ERROR, []
        except ldap_errors.LDAPResponseTimeoutError:
            return TIMEOUT, []
        except ldap_errors.LDAPCommunicationError:
            return SERVER_DOWN, []
        except ldap_errors.LDAPException:
            return FILTER_ERROR, []
        code = (conn.result or {}).get("result", 0)
        entries = [(r.get("dn", ""), list(r.get("raw_attributes", {}).items()))
                   for r in conn.response or [] if r.get("type") == "searchResEntry"]
        return code, entries

    # -- lookups ---------------------------------------------------------------------

    def lookup(self, key: bytes) -> bytes | None:
        flags = self.flags
        if not flags & F.UTF8_ACTIVE and not is_utf8(key):
            return None
        name = lookup_key(key, flags)
        t = self.templates
        if not t.domain_allows(name):
            return None
        base = expand(self.search_base, name, None, t.needs, t.nparts, dn_quote)
        if base is None:
            return None
        query = t.expand_query(name, filter_quote)
        if query is None:
            return None
        for attempt in (1, 2):
            try:
                conn = self.pool.get(float(self.ldap_timeout or 10))
            except HostFailed as exc:
                message = str(exc) or f"{self.spec}: no LDAP connection"
                (maillog.error if isinstance(exc, StartTlsFailed) else maillog.warning)(message)
                raise TableError(message) from None
            broken = True
            try:
                value = self._lookup_on(conn, base, query, name, attempt == 2)
                broken = False
                return value
            except Dropped:
                self.pool.close()      # the idle ones went with the server
            except SearchFailed:
                raise
            except TableError:
                broken = False
                raise
            finally:
                self.pool.put(conn, broken)
        raise AssertionError("not reached")

    def _lookup_on(self, conn, base: str, query: str, name: str, last: bool) -> bytes | None:
        code, entries = self._search(conn, base, self.scope, query, self.attributes)
        if code == SERVER_DOWN and not last:
            raise Dropped()
        if code == SUCCESS:
            state = Expansion()
            self._collect(conn, entries, state, name)
            if state.failed:
                raise TableError(f"table {self.spec}: lookup of '{name}' failed")
            return encode_value(",".join(state.values)) if state.values else None
        if code == NO_SUCH_OBJECT:
            if self.dynamic_base:
                return None
            message = (f"dict_ldap_lookup: {self.parser_name}: Search base '{base}' not found:"
                       f" {code}: {error_text(code)}")
            maillog.warning(message)
            raise TableError(message)
        message = f"dict_ldap_lookup: Search error {code}: {error_text(code)}"
        maillog.warning(message)
        raise SearchFailed(message)

    def _collect(self, conn, entries, state: Expansion, name: str) -> None:
        """Depth first through the nested searches, with a stack of our own
        (recursion_limit may be deeper than Python's)."""
        stack = [self._get_values(conn, entries, state, name, 1)]
        while stack:
            try:
                nested, recursion = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            stack.append(self._get_values(conn, nested, state, name, recursion))

    def _get_values(self, conn, entries, state: Expansion, name: str, recursion: int):
        """dict_ldap_get_values(): the values of one search result's entries;
        yields (entries, level) for each nested search result of a DN or URL
        value of a special attribute, to be collected before it goes on."""
        here = f"dict_ldap_get_values[{recursion}]"
        attrs = self.attributes
        t = self.templates
        count = 0
        is_leaf, is_terminal = True, False        # carried from entry to entry, as in C
        for _dn, attributes in entries:
            count += 1
            if not state.failed and self.size_limit and count > self.size_limit:
                maillog.warning(f"{here}: {self.parser_name}: Query size limit"
                                f" ({self.size_limit}) exceeded")
                state.failed = True
            for attr in attrs[:self.num_terminal]:
                values = values_of(attributes, attr)
                if values is None:
                    continue
                is_terminal = len(values) > 0
                if is_terminal:
                    break
            if not is_terminal and self.num_leaf > 0:
                for attr in attrs[self.num_attributes:]:
                    values = values_of(attributes, attr)
                    if values is None:
                        continue
                    is_leaf = len(values) == 0
                    if not is_leaf:
                        break
            for attr, values in attributes:
                if state.failed or not values:
                    continue
                i = next((n for n, wanted in enumerate(attrs)
                          if attrdesc_subtype(wanted, attr) > 0), len(attrs))
                if i < self.num_attributes or is_terminal:
                    if ((is_terminal and i >= self.num_terminal)
                            or (not is_leaf
                                and self.num_terminal <= i < self.num_terminal + self.num_leaf)):
                        continue
                    for raw in values:
                        text = expand(t.result_format, raw.decode("utf-8", "surrogateescape"),
                                      name, t.needs, t.nparts, None)
                        if text is None:
                            continue
                        state.values.append(text)
                        state.count += 1
                        if self.expansion_limit > 0 and state.count > self.expansion_limit:
                            maillog.warning(f"{here}: {self.parser_name}: Expansion limit"
                                            f" exceeded for key: '{name}'")
                            state.failed = True
                            break
                elif i < len(attrs) and recursion < self.recursion_limit:
                    for raw in values:
                        nested = self._follow(conn, raw.decode("utf-8", "surrogateescape"),
                                              state, recursion)
                        if nested is not None:
                            yield nested, recursion + 1
                        if state.failed:
                            break
                elif i < len(attrs):
                    maillog.warning(f"{here}: {self.parser_name}: Recursion limit exceeded"
                                    f" for special attribute {attr}="
                                    f"{values[0].decode('utf-8', 'replace')}")
                    state.failed = True

    def _follow(self, conn, value: str, state: Expansion, recursion: int):
        """Search one DN or URL value of a special attribute: the entries
        found, or None (skipped, or failed: then state.failed is set)."""
        here = f"dict_ldap_get_values[{recursion}]"
        if is_ldap_url(value):
            try:
                url = parse_search_url(value)
            except ValueError as exc:
                maillog.warning(f"{here}: malformed URL {value}: {exc}(-9)")
                state.failed = True
                return None
            wanted = url_attrs(url.attributes, self.attributes)
            if wanted is None:
                return None
            code, entries = self._search(conn, url.base, getattr(ldap3, SCOPE_NAMES[url.scope]),
                                         url.filter, wanted)
        else:
            code, entries = self._search(conn, value, ldap3.BASE, "(objectClass=*)",
                                         self.attributes)
        if code == SUCCESS:
            return entries
        if code == NO_SUCH_OBJECT:
            maillog.warning(f"{here}: DN {value} not found, skipping")
        else:
            maillog.warning(f"{here}: search error {code}: {error_text(code)}")
            state.failed = True
        return None

    def close(self) -> None:
        self.pool.close()


def _unbind(conn) -> None:
    try:
        conn.unbind()
    except ldap_errors.LDAPException:   # a connection that cannot say goodbye is gone anyway
        pass
