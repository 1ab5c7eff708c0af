"""main.cf and master.cf, read the way Postfix 3.7 reads them.

main.cf: logical lines (comments, whitespace continuation), `name = value`
pairs, last one wins; values are expanded lazily and recursively with
Postfix's `$name` grammar (`${name?text}`, `${name:text}`, braced ternaries,
relational and compatibility-level operators, a nesting limit of 100) and
converted on request to integers, times, booleans and lists. Parameters not
set in main.cf take the `postconf -d` default of Postfix 3.7.11 (Debian), or
where 3.11 changed them (proxy_read_maps) 3.11.7's when the site runs 3.11+
(`proxymap_postfix_version`, by default the installed Postfix's version);
like `postconf -x`, a `$name` of an unset parameter expands to its default.

master.cf: one service per logical line with the eight classic columns and
their `-` defaults, command arguments with `{ ... }` grouping, and the
`-o name=value` / `-o { name = value }` per-service overrides.

Parsing is done by small pure functions; only load_main_cf() and
load_master_cf() touch the file system.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from proxymap.protocol import DEFAULT_MAX_ATTRS, DEFAULT_MAX_MESSAGE
from proxymap.tables.source import logical_lines

BLANKS = " \t\r\n\v\f"
LIST_SEPARATORS = ", \t\r\n"
MAX_NESTING = 100
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]+")

# ---------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """A configuration problem. str() is one line naming file and line when
    known: main.cf style `FILE, line N: reason`, master.cf style
    `FILE: line N: reason` (each as Postfix prints them)."""

    def __init__(self, reason: str, filename: str | None = None,
                 line: int | None = None, sep: str = ", line"):
        self.reason = reason
        self.filename = filename
        self.line = line
        if filename and line:
            text = f"{filename}{sep} {line}: {reason}"
        elif filename:
            text = f"{filename}: {reason}"
        else:
            text = reason
        super().__init__(text)


def _master_error(path: str, line: int, reason: str) -> ConfigError:
    return ConfigError(reason, path, line, sep=": line")


# ---------------------------------------------------------------------------
# Defaults (generated from `postconf -d` of Postfix 3.7.11 on Debian 12; the
# parameters this project uses plus everything their defaults refer to).
# Host-dependent defaults (myhostname, mydomain, mynetworks, process_id,
# process_name) are computed in _dynamic_default().

PROXY_READ_MAPS_DEFAULT = (
    "$local_recipient_maps $mydestination $virtual_alias_maps $virtual_alias_domains"
    " $virtual_mailbox_maps $virtual_mailbox_domains $relay_recipient_maps $relay_domains"
    " $canonical_maps $sender_canonical_maps $recipient_canonical_maps $relocated_maps"
    " $transport_maps $mynetworks $smtpd_sender_login_maps $sender_bcc_maps"
    " $recipient_bcc_maps $smtp_generic_maps $lmtp_generic_maps $alias_maps"
    " $smtpd_client_restrictions $smtpd_helo_restrictions $smtpd_sender_restrictions"
    " $smtpd_relay_restrictions $smtpd_recipient_restrictions"
    " $address_verify_sender_dependent_default_transport_maps"
    " $address_verify_sender_dependent_relayhost_maps $address_verify_transport_maps"
    " $fallback_transport_maps $lmtp_discard_lhlo_keyword_address_maps"
    " $lmtp_pix_workaround_maps $lmtp_sasl_password_maps $lmtp_tls_policy_maps"
    " $mailbox_command_maps $mailbox_transport_maps"
    " $postscreen_discard_ehlo_keyword_address_maps $rbl_reply_maps"
    " $sender_dependent_default_transport_maps $sender_dependent_relayhost_maps"
    " $smtp_discard_ehlo_keyword_address_maps $smtp_pix_workaround_maps"
    " $smtp_sasl_password_maps $smtp_tls_policy_maps"
    " $smtpd_discard_ehlo_keyword_address_maps $smtpd_milter_maps $virtual_gid_maps"
    " $virtual_uid_maps $local_login_sender_maps $postscreen_reject_footer_maps"
    " $smtpd_reject_footer_maps $tls_server_sni_maps $tlsproxy_client_policy_maps"
    " $default_delivery_status_filter $lmtp_delivery_status_filter $lmtp_dns_reply_filter"
    " $lmtp_reply_filter $local_delivery_status_filter $pipe_delivery_status_filter"
    " $postscreen_command_filter $smtp_delivery_status_filter $smtp_dns_reply_filter"
    " $smtp_reply_filter $smtpd_command_filter $smtpd_dns_reply_filter"
    " $virtual_delivery_status_filter $body_checks $header_checks $lmtp_body_checks"
    " $lmtp_header_checks $lmtp_mime_header_checks $lmtp_nested_header_checks"
    " $milter_header_checks $mime_header_checks $nested_header_checks $smtp_body_checks"
    " $smtp_header_checks $smtp_mime_header_checks $smtp_nested_header_checks")

# Postfix 3.11 (postconf -d of 3.11.7, Debian sid) names 25 more parameters in
# proxy_read_maps; here they are with their 3.11 defaults. They apply when the
# site runs 3.11 or later (MainConfig.postfix_release).
PROXY_READ_MAPS_ADDED_311 = """
    smtpd_reject_filter_maps debug_peer_list smtpd_etrn_restrictions fast_flush_domains
    authorized_flush_users lmtp_connection_cache_destinations local_header_rewrite_clients
    masquerade_exceptions postscreen_access_list postscreen_allowlist_interfaces
    postscreen_forbidden_commands qmqpd_authorized_clients authorized_mailq_users
    smtp_connection_cache_destinations smtpd_log_access_permit_actions
    smtpd_forbidden_commands smtpd_client_event_limit_exceptions
    smtpd_sasl_exceptions_networks smtpd_sasl_mechanism_filter smtp_requiretls_policy
    smtp_sasl_mechanism_filter authorized_submit_users smtpd_authorized_verp_clients
    smtpd_authorized_xclient_hosts smtpd_authorized_xforward_hosts
""".split()
PROXY_READ_MAPS_DEFAULT_311 = (PROXY_READ_MAPS_DEFAULT
                               + "".join(f" ${name}" for name in PROXY_READ_MAPS_ADDED_311))
DEFAULTS_311: dict[str, str] = dict.fromkeys(PROXY_READ_MAPS_ADDED_311, "")
DEFAULTS_311.update({
    "proxy_read_maps": PROXY_READ_MAPS_DEFAULT_311,
    "fast_flush_domains": "$relay_domains",
    "authorized_flush_users": "static:anyone",
    "local_header_rewrite_clients": "permit_inet_interfaces",
    "postscreen_access_list": "permit_mynetworks",
    "postscreen_allowlist_interfaces": ("${postscreen_whitelist_interfaces?"
                                        "{$postscreen_whitelist_interfaces}:{static:all}}"),
    "postscreen_forbidden_commands": "$smtpd_forbidden_commands",
    "authorized_mailq_users": "static:anyone",
    "smtpd_forbidden_commands": "CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}",
    "smtpd_client_event_limit_exceptions": "${smtpd_client_connection_limit_exceptions:$mynetworks}",
    "smtpd_sasl_mechanism_filter": "!external, static:rest",
    "smtp_requiretls_policy": ("inline:{{${domain_to_ascii{$mydomain}}=opportunistic},"
                               " {.${domain_to_ascii{$mydomain}}=opportunistic},"
                               " {localhost=opportunistic}}, cidr:{{0.0.0.0/0 opportunistic},"
                               " {::/0 opportunistic}}, enforce"),
    "authorized_submit_users": "static:anyone",
    "smtpd_authorized_verp_clients": "$authorized_verp_clients",
    "authorized_verp_clients": "",
    "smtpd_client_connection_limit_exceptions": "",
    "smtpd_restriction_classes": "",
})

_EMPTY_DEFAULTS = """
    body_checks canonical_maps debugger_command default_delivery_status_filter
    fallback_transport_maps header_checks lmtp_body_checks
    lmtp_discard_lhlo_keyword_address_maps lmtp_dns_reply_filter lmtp_generic_maps
    lmtp_header_checks lmtp_mime_header_checks lmtp_nested_header_checks
    lmtp_pix_workaround_maps lmtp_reply_filter lmtp_sasl_auth_cache_name
    lmtp_sasl_password_maps lmtp_tls_policy_maps mailbox_command_maps
    mailbox_transport_maps maillog_file master_service_disable milter_header_checks
    multi_instance_directories multi_instance_name postscreen_command_filter
    rbl_reply_maps recipient_bcc_maps recipient_canonical_maps relay_recipient_maps
    relocated_maps sender_bcc_maps sender_canonical_maps
    sender_dependent_default_transport_maps sender_dependent_relayhost_maps service_name
    smtp_body_checks smtp_discard_ehlo_keyword_address_maps smtp_dns_reply_filter
    smtp_generic_maps smtp_header_checks smtp_mime_header_checks smtp_nested_header_checks
    smtp_pix_workaround_maps smtp_reply_filter smtp_sasl_auth_cache_name
    smtp_sasl_password_maps smtp_tls_policy_maps smtpd_client_restrictions
    smtpd_command_filter smtpd_discard_ehlo_keyword_address_maps smtpd_dns_reply_filter
    smtpd_helo_restrictions smtpd_milter_maps smtpd_recipient_restrictions
    smtpd_reject_footer_maps smtpd_sender_login_maps smtpd_sender_restrictions
    tls_server_sni_maps transport_maps virtual_gid_maps virtual_mailbox_maps
    virtual_uid_maps
""".split()

DEFAULTS: dict[str, str] = dict.fromkeys(_EMPTY_DEFAULTS, "")
DEFAULTS.update({
    # Directories and identity.
    "config_directory": "/etc/postfix",
    "queue_directory": "/var/spool/postfix",
    "data_directory": "/var/lib/postfix",
    "daemon_directory": "/usr/lib/postfix/sbin",
    "command_directory": "/usr/sbin",
    "meta_directory": "/etc/postfix",
    "shlib_directory": "/usr/lib/postfix",
    "process_id_directory": "pid",
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "mail_version": "3.7.11",
    "mail_release_date": "20240304",
    "compatibility_level": "0",
    # Process management.
    "daemon_timeout": "18000s",
    "ipc_timeout": "3600s",
    "ipc_idle": "5s",
    "ipc_ttl": "1000s",
    "max_idle": "100s",
    "max_use": "100",
    "default_process_limit": "100",
    "service_throttle_time": "60s",
    "in_flow_delay": "1s",
    "inet_interfaces": "all",
    "inet_protocols": "all",
    "import_environment": ("MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY"
                           " LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"),
    # Logging.
    "syslog_name": "${multi_instance_name?{$multi_instance_name}:{postfix}}",
    "syslog_facility": "mail",
    "maillog_file_prefixes": "/var, /dev/stdout",
    "postlog_service_name": "postlog",
    # Tables.
    "smtputf8_enable": "${{$compatibility_level} <level {1} ? {no} : {yes}}",
    "default_database_type": "hash",
    "lmdb_map_size": "16777216",
    "berkeley_db_read_buffer_size": "131072",
    "berkeley_db_create_buffer_size": "16777216",
    "proxymap_service_name": "proxymap",
    "proxywrite_service_name": "proxywrite",
    "proxy_read_maps": PROXY_READ_MAPS_DEFAULT,
    "proxy_write_maps": ("$smtp_sasl_auth_cache_name $lmtp_sasl_auth_cache_name"
                         " $address_verify_map $postscreen_cache_map"),
    # What proxy_read_maps / proxy_write_maps refer to.
    "address_verify_map": "btree:$data_directory/verify_cache",
    "postscreen_cache_map": "btree:$data_directory/postscreen_cache",
    "address_verify_sender_dependent_default_transport_maps":
        "$sender_dependent_default_transport_maps",
    "address_verify_sender_dependent_relayhost_maps": "$sender_dependent_relayhost_maps",
    "address_verify_transport_maps": "$transport_maps",
    "alias_database": "hash:/etc/aliases",
    "alias_maps": "hash:/etc/aliases, nis:mail.aliases",
    "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
    "local_login_sender_maps": "static:*",
    "lmtp_delivery_status_filter": "$default_delivery_status_filter",
    "local_delivery_status_filter": "$default_delivery_status_filter",
    "pipe_delivery_status_filter": "$default_delivery_status_filter",
    "smtp_delivery_status_filter": "$default_delivery_status_filter",
    "virtual_delivery_status_filter": "$default_delivery_status_filter",
    "mime_header_checks": "$header_checks",
    "nested_header_checks": "$header_checks",
    "postscreen_discard_ehlo_keyword_address_maps": "$smtpd_discard_ehlo_keyword_address_maps",
    "postscreen_reject_footer_maps": "$smtpd_reject_footer_maps",
    "smtpd_relay_restrictions": ("${{$compatibility_level} <level {1} ? {} :"
                                 " {permit_mynetworks, permit_sasl_authenticated,"
                                 " defer_unauth_destination}}"),
    "tlsproxy_client_policy_maps": "${tlsproxy_client_policy:$smtp_tls_policy_maps}",
    "virtual_alias_domains": "$virtual_alias_maps",
    "virtual_alias_maps": "$virtual_maps",
    "virtual_mailbox_domains": "$virtual_mailbox_maps",
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "myorigin": "$myhostname",
    "mynetworks_style": "${{$compatibility_level} <level {2} ? {subnet} : {host}}",
    "relay_domains": "${{$compatibility_level} <level {2} ? {$mydestination} : {}}",
    # Our own: limits of the attribute codec (proxymap/protocol.py).
    "proxymap_max_attributes": str(DEFAULT_MAX_ATTRS),
    "proxymap_max_request_size": str(DEFAULT_MAX_MESSAGE),
    # Our own: open connections at which a worker counts as busy; the master
    # starts another worker when every worker of a service is busy.
    "proxymap_worker_busy_clients": "32",
    # Our own: the master.cf-format file proxymap-master takes its services
    # from (beside Postfix's master, a file of its own; -m FILE overrides).
    "proxymap_master_cf": "$config_directory/master.cf",
    # Our own: lanes of threads for tables that wait on a server
    # (proxymap/offload.py): threads per table, requests that may wait for
    # them, seconds before an unanswered request is answered RETRY.
    "proxymap_backend_threads": "4",
    "proxymap_backend_queue": "64",
    "proxymap_backend_timeout": "10s",
    # Our own: the Postfix release whose defaults and allow-list rules apply
    # (3.11+: its longer proxy_read_maps, tables named in /file/name values
    # and restriction classes); "auto" asks the installed postconf(1).
    "proxymap_postfix_version": "auto",
    # Our own: bounded work per client connection (proxymap/server.py):
    # decoded requests waiting for an answer, reply bytes unsent before the
    # next reply is made, BAD replies before the connection is closed (0:
    # never).
    "proxymap_max_pipelined_requests": "16",
    "proxymap_max_unsent_reply_bytes": "65536",
    "proxymap_max_bad_requests": "10",
    # Our own: the Prometheus listener (master/exporter.py): empty = none, an
    # absolute UNIX socket path, or a loopback host:port (port 0: any).
    "proxymap_metrics_listen": "",
})

#: parameters of this project that Postfix does not know
OWN_PARAMETERS = ("proxymap_max_attributes", "proxymap_max_request_size",
                  "proxymap_worker_busy_clients", "proxymap_master_cf",
                  "proxymap_backend_threads", "proxymap_backend_queue", "proxymap_backend_timeout",
                  "proxymap_postfix_version",
                  "proxymap_max_pipelined_requests", "proxymap_max_unsent_reply_bytes",
                  "proxymap_max_bad_requests", "proxymap_metrics_listen")

DYNAMIC_DEFAULTS = ("myhostname", "mydomain", "mynetworks", "process_id", "process_name")
READ_ONLY = ("process_id", "process_name")

# (min, max) of numeric and time parameters; None = no bound.
LIMITS: dict[str, tuple[int | None, int | None]] = {
    name: (1, None) for name in (
        "default_process_limit", "max_use", "max_idle", "ipc_timeout", "ipc_idle",
        "ipc_ttl", "daemon_timeout", "service_throttle_time", "lmdb_map_size",
        "berkeley_db_read_buffer_size", "berkeley_db_create_buffer_size",
        "proxymap_max_attributes", "proxymap_max_request_size",
        "proxymap_worker_busy_clients",
        "proxymap_backend_threads", "proxymap_backend_queue", "proxymap_backend_timeout",
        "proxymap_max_pipelined_requests", "proxymap_max_unsent_reply_bytes")
}
LIMITS["proxymap_max_bad_requests"] = (0, None)
LIMITS["in_flow_delay"] = (0, 10)

# Parameters Postfix stores as `long`; all other integers must fit an `int`.
LONG_PARAMETERS = frozenset({"lmdb_map_size", "proxymap_max_request_size"})
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1

# ---------------------------------------------------------------------------
# Lexical layer shared by main.cf and master.cf


def read_logical_lines(data: bytes, path: str,
                       warn: Callable[[str], None]) -> list[tuple[int, str]]:
    """(first physical line number, text) of each logical line; a leading
    continuation with nothing to continue is warned about and skipped."""
    result = []
    for number, raw in logical_lines(data.splitlines()):
        text = raw.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t"):
            snippet = text.strip(BLANKS)[:30]
            warn(f"{path}: logical line must not start with whitespace: \"{snippet}\"")
            continue
        result.append((number, text))
    return result


def split_name_value(line: str) -> tuple[str, str]:
    """`name = value` -> (name, value) with blanks around both removed.
    Raises ConfigError(reason) without location."""
    text = line.strip(BLANKS)
    end = 0
    while end < len(text) and text[end] not in BLANKS and text[end] != "=":
        end += 1
    name = text[:end]
    rest = text[end:].lstrip(BLANKS)
    if not rest.startswith("="):
        raise ConfigError(f"missing '=' after attribute name: \"{text}\"")
    if not name:
        raise ConfigError("missing attribute name")
    return name, rest[1:].strip(BLANKS)


def parse_main_cf(data: bytes, path: str, warn: Callable[[str], None]
                  ) -> dict[str, tuple[str, int]]:
    """name -> (raw value, line number); the last assignment wins."""
    entries: dict[str, tuple[str, int]] = {}
    for number, line in read_logical_lines(data, path, warn):
        try:
            name, value = split_name_value(line)
        except ConfigError as exc:
            raise ConfigError(exc.reason, path, number) from None
        if name in entries:
            warn(f"{path}, line {number}: overriding earlier entry: {name}={entries[name][0]}")
            del entries[name]  # keep file order of the surviving entry
        entries[name] = (value, number)
    return entries


# ---------------------------------------------------------------------------
# $name expansion


class MacroError(ConfigError):
    """A syntax or nesting error inside a parameter value."""


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in BLANKS:
        i += 1
    return i


def _find_close(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket closing text[start] (== open_ch), or -1."""
    level = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            level += 1
        elif text[i] == close_ch:
            level -= 1
            if level == 0:
                return i
    return -1


def _braced(text: str, i: int, context: str) -> tuple[str, int]:
    """Parse `{...}` at text[i]; return (inside, index after '}')."""
    close = _find_close(text, i, "{", "}")
    if close < 0:
        raise MacroError(f"missing '}}' in \"{context}\"")
    return text[i + 1:close], close + 1


_RELATIONAL_OPS = ("<=level", ">=level", "==level", "!=level", "<level", ">level",
                   "==", "!=", "<=", ">=", "<", ">")


def parse_compat_level(text: str) -> tuple[int, int, int]:
    """'3.6' -> (3, 6, 0); Postfix compatibility levels are major[.minor[.patch]]."""
    parts = text.strip(BLANKS).split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise MacroError(f"malformed compatibility level: \"{text}\"")
    nums = [int(p) for p in parts] + [0, 0]
    return nums[0], nums[1], nums[2]


def compare(left: str, op: str, right: str) -> bool:
    """Relational test of ${{a} OP {b}}: levels for `...level`, numbers when
    both sides are all digits, otherwise byte order."""
    if op.endswith("level"):
        a, b = parse_compat_level(left), parse_compat_level(right)
        op = op[:-5]
    elif left.isdigit() and right.isdigit() and left.isascii() and right.isascii():
        a, b = int(left), int(right)
    else:
        a, b = left.encode("utf-8", "surrogateescape"), right.encode("utf-8", "surrogateescape")
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b,
            ">": a > b, ">=": a >= b}[op]


def _conditional(body: str, i: int, op: str, truth: bool, again, depth: int) -> str:
    """Evaluate the part of `${...}` from the `?`/`:` at body[i]."""
    j = _skip_blanks(body, i + 1)
    if j >= len(body) or body[j] != "{":
        chosen = body[i + 1:] if (truth if op == "?" else not truth) else ""
        return again(chosen, depth + 1) if chosen else ""
    first, j = _braced(body, j, body)
    j = _skip_blanks(body, j)
    second = None
    if j < len(body):
        if op != "?" or body[j] != ":":
            raise MacroError(f"unexpected input at: \"...{body[:j]}>>>{body[j:]}\"")
        k = _skip_blanks(body, j + 1)
        if k < len(body) and body[k] == "{":
            second, k = _braced(body, k, body)
            k = _skip_blanks(body, k)
            if k < len(body):
                raise MacroError(f"unexpected input at: \"...{body[:k]}>>>{body[k:]}\"")
        else:
            second = body[j + 1:]
    if op == "?":
        chosen = first if truth else (second or "")
    else:
        chosen = first if not truth else ""
    return again(chosen, depth + 1) if chosen else ""


def _relational(body: str, again, depth: int) -> str:
    """`{a} OP {b}` optionally followed by `?...`/`:...`."""
    left, i = _braced(body, 0, body)
    i = _skip_blanks(body, i)
    op = next((o for o in _RELATIONAL_OPS if body.startswith(o, i)), None)
    if op is None:
        raise MacroError(f"\"==\" or \"!=\" or \"<\" or \"<=\" or \">=\" or \">\" expected at: "
                         f"\"...{body[:i]}>>>{body[i:]}\"")
    i = _skip_blanks(body, i + len(op))
    if i >= len(body) or body[i] != "{":
        raise MacroError(f"\"{{expression}}\" expected at: \"...{body[:i]}>>>{body[i:]}\"")
    right, i = _braced(body, i, body)
    truth = compare(again(left, depth + 1), op, again(right, depth + 1))
    i = _skip_blanks(body, i)
    if i >= len(body):
        return "true" if truth else ""
    if body[i] not in "?:":
        raise MacroError(f"\"?\" or \":\" expected at: \"...{body[:i]}>>>{body[i:]}\"")
    return _conditional(body, i, body[i], truth, again, depth)


def expand(text: str, lookup: Callable[[str], str | None], depth: int = 0) -> str:
    """Expand `$` references in `text`. lookup(name) returns the raw value of
    a parameter (main.cf or default) or None if undefined; substituted values
    are expanded in turn. Raises MacroError on bad syntax or on nesting
    deeper than MAX_NESTING."""

    def again(inner: str, level: int) -> str:
        return expand(inner, lookup, level)

    if depth > MAX_NESTING:
        raise MacroError(f"unreasonable macro call nesting: \"{text[:60]}\"")
    out = []
    i = 0
    n = len(text)
    while i < n:
        dollar = text.find("$", i)
        if dollar < 0:
            out.append(text[i:])
            break
        out.append(text[i:dollar])
        i = dollar + 1
        if i >= n:
            raise MacroError(f"empty macro name: \"{text}\"")
        c = text[i]
        if c == "$":
            out.append("$")
            i += 1
            continue
        if c in "{(":
            close_ch = "}" if c == "{" else ")"
            close = _find_close(text, i, c, close_ch)
            if close < 0:
                raise MacroError(f"truncated macro reference: \"{text[dollar:]}\"")
            out.append(_expand_braced(text[i + 1:close], lookup, again, depth))
            i = close + 1
            continue
        match = _NAME_CHARS.match(text, i)
        if not match:
            raise MacroError(f"empty macro name: \"{text[dollar:]}\"")
        out.append(_substitute(match.group(), lookup, again, depth))
        i = match.end()
    return "".join(out)


def _substitute(name: str, lookup, again, depth: int) -> str:
    if depth + 1 > MAX_NESTING:
        raise MacroError(f"unreasonable macro call nesting: \"{name}\"")
    value = lookup(name)
    return again(value, depth + 1) if value else ""


def domain_to_ascii(text: str) -> str:
    """Postfix 3.11's ${domain_to_ascii{text}}: the domain in IDNA (A-label) form."""
    try:
        return text.encode("idna").decode("ascii") if text else text
    except UnicodeError:
        return text


#: Postfix 3.11's ${function{text}} forms
MACRO_FUNCTIONS = {"domain_to_ascii": domain_to_ascii}


def _expand_braced(body: str, lookup, again, depth: int) -> str:
    """The inside of ${...} or $(...)."""
    i = _skip_blanks(body, 0)
    if i < len(body) and body[i] == "{":
        return _relational(body[i:], again, depth)
    match = _NAME_CHARS.match(body, i)
    j = _skip_blanks(body, match.end()) if match else i
    if match and match.group() in MACRO_FUNCTIONS and body[j:j + 1] == "{":
        close = _find_close(body, j, "{", "}")
        if close >= 0 and not body[close + 1:].strip(BLANKS):
            return MACRO_FUNCTIONS[match.group()](again(body[j + 1:close], depth + 1))
    if not match or (j < len(body) and body[j] not in "?:"):
        raise MacroError(f"attribute name syntax error at: \"...{body[:j]}>>>{body[j:]}\"")
    name = match.group()
    if j >= len(body):
        return _substitute(name, lookup, again, depth)
    truth = bool(lookup(name))
    return _conditional(body, j, body[j], truth, again, depth)


# ---------------------------------------------------------------------------
# Value conversions


def parse_table_list(value: str) -> list[str]:
    """Split a list on commas and whitespace, keeping `{...}` groups (and
    `type:{...}` names) as single tokens with their braces intact.
    Raises ConfigError on an unbalanced `{`."""
    tokens = []
    i = 0
    n = len(value)
    while i < n:
        if value[i] in LIST_SEPARATORS:
            i += 1
            continue
        start = i
        level = 0
        while i < n and (level > 0 or value[i] not in LIST_SEPARATORS):
            if value[i] == "{":
                level += 1
            elif value[i] == "}" and level > 0:
                level -= 1
            i += 1
        if level > 0:
            raise ConfigError(f"missing '}}' in \"{value[start:]}\"")
        tokens.append(value[start:i])
    return tokens


def strip_group(token: str) -> str:
    """`{ text }` -> `text` (outer braces and the blanks just inside them
    removed); any other token is returned unchanged."""
    if token.startswith("{") and _find_close(token, 0, "{", "}") == len(token) - 1:
        return token[1:-1].strip(BLANKS)
    return token


def split_list(value: str) -> list[str]:
    """A Postfix list value as items: separators are `,` and whitespace and
    a `{...}` group is one item with its outer braces removed."""
    return [strip_group(t) for t in parse_table_list(value)]


def parse_bool(value: str) -> bool:
    low = value.lower()
    if low == "yes":
        return True
    if low == "no":
        return False
    raise ValueError(value)


def parse_int(value: str, maximum: int = INT_MAX) -> int:
    """strtol()-style decimal over the whole string, within +-maximum."""
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise ValueError(value)
    number = int(value)
    if not -maximum - 1 <= number <= maximum:
        raise ValueError(value)
    return number


TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, default_unit: str = "s") -> int:
    """Seconds from `N[unit]`; only the first character after the digits is
    looked at (`5sec` is 5 s, as in Postfix). Raises ValueError."""
    match = re.match(r"[0-9]+", value)
    if not match:
        raise ValueError(value)
    rest = value[match.end():]
    unit = rest[:1] or default_unit
    if unit not in TIME_UNITS:
        raise ValueError(value)
    seconds = int(match.group()) * TIME_UNITS[unit]
    if seconds > INT_MAX:
        raise ValueError(value)
    return seconds


def default_time_unit(default: str | None, fallback: str = "s") -> str:
    """The unit of a time parameter: the letter its default ends with."""
    if default and default[-1] in TIME_UNITS:
        return default[-1]
    return fallback


# ---------------------------------------------------------------------------
# Allow-lists of proxymap / proxywrite


_COMPOSITE_PREFIXES = ("unionmap:{", "pipemap:{")


def proxy_allow_set(value: str, read_lines: Callable[[str], Iterable[str]] | None = None,
                    _depth: int = 0) -> set[str]:
    """Canonical `type:name` strings that an expanded proxy_read_maps or
    proxy_write_maps value authorises: tokens starting with `proxy:` (all such
    prefixes removed), including members of unquoted unionmap:/pipemap:
    composites and the first word of `{...}` groups. With `read_lines`
    (Postfix 3.11+), a `/file/name` token stands for the file's logical
    lines, read by read_lines(path), each searched the same way."""
    allowed: set[str] = set()
    for token in parse_table_list(value):
        if token.startswith("{"):
            words = strip_group(token).split()
            if not words:
                continue
            token = words[0]
        if token.startswith("/") and read_lines is not None:
            if _depth < MAX_NESTING:
                for line in read_lines(token):
                    allowed |= proxy_allow_set(line, read_lines, _depth + 1)
            continue
        if token.startswith(_COMPOSITE_PREFIXES) and token.endswith("}"):
            inner = token[token.index("{"):]
            allowed |= proxy_allow_set(strip_group(inner), read_lines, _depth)
            continue
        if not token.startswith("proxy:"):
            continue
        while token.startswith("proxy:"):
            token = token[len("proxy:"):]
        if ":" in token:
            allowed.add(token)
    return allowed


def parse_release(text: str) -> tuple[int, int] | None:
    """(major, minor) of a Postfix version such as 3.11.7 or 3.11; None if
    it is not one."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?(?:[-.~+].*)?", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---------------------------------------------------------------------------
# Host-dependent defaults


def default_myhostname() -> str:
    """gethostname(), with `.localdomain` appended when it has no dot."""
    name = socket.gethostname()
    return name if "." in name else f"{name}.localdomain"


def domain_of(hostname: str) -> str:
    """mydomain default: what follows the first dot (possibly nothing),
    else `localdomain`."""
    _, dot, rest = hostname.partition(".")
    return rest if dot else "localdomain"


def interface_networks(style: str, protocols: str = "all",
                       loopback_only: bool = False) -> str:
    """mynetworks default from the host's interface addresses: `host` gives
    each address, `subnet` its network, `class` (IPv4) its class A/B/C net."""
    import psutil  # only for this host-dependent default

    v4, v6 = [], []
    for addresses in psutil.net_if_addrs().values():
        for addr in addresses:
            if addr.family not in (socket.AF_INET, socket.AF_INET6) or not addr.netmask:
                continue
            try:
                mask = ipaddress.ip_address(addr.netmask.split("/")[0])
                prefix = bin(int(mask)).count("1")
                iface = ipaddress.ip_interface(f"{addr.address.split('%')[0]}/{prefix}")
            except ValueError:
                continue
            if loopback_only and not iface.ip.is_loopback:
                continue
            (v4 if iface.version == 4 else v6).append(iface)
    words: list[str] = []
    protos = protocols.lower().replace(",", " ").split()
    families = []
    if "all" in protos or "ipv4" in protos:
        families.append(v4)
    if "all" in protos or "ipv6" in protos:
        families.append(v6)
    for family in families:
        for iface in family:
            if style == "host":
                net = ipaddress.ip_network(iface.ip)
            elif style == "class" and iface.version == 4:
                first = int(iface.ip) >> 24
                prefix = 8 if first < 128 else 16 if first < 192 else 24
                net = ipaddress.ip_network(f"{iface.ip}/{prefix}", strict=False)
            else:
                net = iface.network
            text = (f"{net.network_address}/{net.prefixlen}" if net.version == 4
                    else f"[{net.network_address}]/{net.prefixlen}")
            if text not in words:
                words.append(text)
    return " ".join(words)


# ---------------------------------------------------------------------------
# main.cf


@dataclass(frozen=True)
class _Setting:
    value: str
    filename: str | None  # None: from an override
    line: int | None


class MainConfig:
    """Parameters of one main.cf plus overrides; values expand on access."""

    def __init__(self, config_directory: str, path: str,
                 entries: Mapping[str, tuple[str, int]],
                 overrides: Mapping[str, str] | None = None,
                 warnings: Iterable[str] = ()):
        self.config_directory = config_directory
        self.path = path
        self.warnings = list(warnings)
        self.process_name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        self._settings: dict[str, _Setting] = {
            "config_directory": _Setting(config_directory, path, None)}
        for name, (value, line) in entries.items():
            if name not in READ_ONLY and name != "config_directory":
                self._settings[name] = _Setting(value, path, line)
        self._explicit = dict((name, value) for name, (value, _) in entries.items())
        self._explicit.setdefault("config_directory", config_directory)
        self._cache: dict[str, str] = {}
        self._busy_mydomain = False
        self._release: tuple[int, int] | None = None
        for name, value in (overrides or {}).items():
            self._set_override(name, value)

    def _set_override(self, name: str, value: str) -> None:
        if name in READ_ONLY:
            return
        self._settings[name] = _Setting(value, None, None)
        self._explicit[name] = value
        if name == "config_directory":
            self.config_directory = value
        self._cache.clear()
        self._release = None

    # -- raw access ---------------------------------------------------------

    def raw(self, name: str) -> str | None:
        """The value as written in main.cf (or an override), None if unset."""
        if name in READ_ONLY:
            return None
        setting = self._settings.get(name)
        return setting.value if setting else None

    def default(self, name: str) -> str | None:
        """The unexpanded default of a known parameter, else None."""
        if name in DEFAULTS_311 and self.postfix_release() >= (3, 11):
            return DEFAULTS_311[name]
        if name in DEFAULTS:
            return DEFAULTS[name]
        if name in DYNAMIC_DEFAULTS:
            return self._dynamic_default(name)
        return None

    def postfix_release(self) -> tuple[int, int]:
        """(major, minor) of the Postfix whose defaults apply: the value of
        proxymap_postfix_version, or with "auto" (the default) the
        mail_version of the installed Postfix ($command_directory/postconf),
        or 3.7 when none answers."""
        if self._release is None:
            self._release = (3, 7)   # while finding out: the reference release
            value = self.get("proxymap_postfix_version").strip()
            if value.lower() == "auto":
                from master.postfix_version import installed_mail_version
                value = installed_mail_version(self.get("command_directory")) or "3.7"
            release = parse_release(value)
            if release is None:
                self._release = None
                raise self._where("proxymap_postfix_version",
                                  f"bad proxymap_postfix_version value: {value}"
                                  " (expected auto or a release such as 3.11)")
            self._release = release
        return self._release

    def _dynamic_default(self, name: str) -> str:
        if name == "process_id":
            return str(os.getpid())
        if name == "process_name":
            return self.process_name
        if name == "myhostname":
            return default_myhostname()
        if name == "mydomain":
            # `myhostname = host.$mydomain` with mydomain unset: Postfix
            # ends up with an empty mydomain; so do we, without looping.
            if self._busy_mydomain:
                return ""
            self._busy_mydomain = True
            try:
                return domain_of(self.get("myhostname"))
            finally:
                self._busy_mydomain = False
        # mynetworks
        interfaces = self.get("inet_interfaces").lower()
        return interface_networks(self.get("mynetworks_style").lower(),
                                  self.get("inet_protocols"),
                                  loopback_only=interfaces in ("loopback-only", "localhost"))

    def _lookup(self, name: str) -> str | None:
        value = self.raw(name)
        return value if value is not None else self.default(name)

    def _where(self, name: str, reason: str) -> ConfigError:
        setting = self._settings.get(name)
        if setting and setting.filename:
            return ConfigError(reason, setting.filename, setting.line)
        if setting:
            return ConfigError(f"-o {name}={setting.value}: {reason}")
        return ConfigError(reason)

    def locate(self, name: str, reason: str) -> ConfigError:
        """A ConfigError for parameter `name` naming where it was set
        (main.cf file and line, or the -o override; main.cf alone for a
        default value)."""
        if name not in self._settings:
            return ConfigError(reason, self.path)
        return self._where(name, reason)

    # -- expanded values ----------------------------------------------------

    def get(self, name: str) -> str:
        """Fully expanded value: main.cf/override, else the default, else ''."""
        if name in self._cache:
            return self._cache[name]
        raw = self._lookup(name)
        if raw is None:
            return ""
        try:
            value = expand(raw, self._lookup)
        except MacroError as exc:
            raise self._where(name, f"parameter {name}: {exc.reason}") from None
        if name not in READ_ONLY:
            self._cache[name] = value
        return value

    def get_int(self, name: str) -> int:
        value = self.get(name)
        maximum = LONG_MAX if name in LONG_PARAMETERS else INT_MAX
        try:
            number = parse_int(value, maximum)
        except ValueError:
            raise self._where(name, f"bad numerical configuration: {name} = {value}") from None
        low, high = LIMITS.get(name, (None, None))
        if low is not None and number < low:
            raise self._where(name, f"invalid {name} parameter value {number} < {low}")
        if high is not None and number > high:
            raise self._where(name, f"invalid {name} parameter value {number} > {high}")
        return number

    def get_time(self, name: str, unit: str = "s") -> int:
        """Seconds. A bare number takes the parameter's own default unit (the
        letter its default ends with), or `unit` for parameters without one."""
        value = self.get(name)
        try:
            seconds = parse_time(value, default_time_unit(self.default(name), unit))
        except ValueError:
            raise self._where(name, f"parameter {name}: bad time value or unit: {value}") from None
        low, high = LIMITS.get(name, (None, None))
        if low is not None and seconds < low:
            raise self._where(name, f"invalid {name}: {seconds} (min {low})")
        if high is not None and seconds > high:
            raise self._where(name, f"invalid {name}: {seconds} (max {high})")
        return seconds

    def get_bool(self, name: str) -> bool:
        value = self.get(name)
        try:
            return parse_bool(value)
        except ValueError:
            raise self._where(name, f"bad boolean configuration: {name} = {value}") from None

    def get_list(self, name: str) -> list[str]:
        value = self.get(name)
        try:
            return split_list(value)
        except ConfigError as exc:
            raise self._where(name, f"{name}: {exc.reason}") from None

    def compatibility_level(self) -> tuple[int, int, int]:
        try:
            return parse_compat_level(self.get("compatibility_level"))
        except MacroError as exc:
            raise self._where("compatibility_level", exc.reason) from None

    # -- whole-configuration views -------------------------------------------

    def with_overrides(self, overrides: Mapping[str, str]) -> "MainConfig":
        """A copy with `-o name=value` settings applied in order (later wins)."""
        clone = MainConfig.__new__(MainConfig)
        clone.__dict__.update(self.__dict__)
        clone._settings = dict(self._settings)
        clone._explicit = dict(self._explicit)
        clone.warnings = list(self.warnings)
        clone._cache = {}
        clone._release = None
        for name, value in overrides.items():
            clone._set_override(name, value)
        return clone

    def explicit(self) -> dict[str, str]:
        """Names set in main.cf (and overrides) with raw values, plus
        config_directory, as `postconf -n` lists them."""
        return dict(self._explicit)

    def defaults(self) -> dict[str, str]:
        """Every known default, unexpanded, as `postconf -d` shows them."""
        result = dict(DEFAULTS)
        if self.postfix_release() >= (3, 11):
            result.update(DEFAULTS_311)
        hostname = default_myhostname()
        result.update(process_id=str(os.getpid()), process_name=self.process_name,
                      myhostname=hostname, mydomain=domain_of(hostname),
                      # evaluated with the default mynetworks_style, as postconf -d does
                      mynetworks=interface_networks(expand(DEFAULTS["mynetworks_style"],
                                                           DEFAULTS.get)))
        return dict(sorted(result.items()))

    def unused(self) -> list[str]:
        """Names set in main.cf that are neither known here nor referenced as
        `$name` by another value (a hint, since only part of Postfix's
        parameter list is known here)."""
        referenced: set[str] = set()
        for setting in self._settings.values():
            referenced.update(referenced_names(setting.value))
        return [name for name in self._explicit
                if name not in DEFAULTS and name not in DYNAMIC_DEFAULTS
                and name not in DEFAULTS_311 and name not in referenced]


_REFERENCE = re.compile(r"\$[{(]?[ \t]*([A-Za-z0-9_]+)")


def referenced_names(value: str) -> list[str]:
    """Parameter names a value refers to as $name, ${name...} or $(name)."""
    return _REFERENCE.findall(value)


def read_settled(path: str, settle: bool = False, attempts: int = 20,
                 pause: float = 0.3) -> bytes:
    """Read a whole file. With `settle`, follow Postfix's hot-file rule: while
    the file's mtime lies between (start of read - 1 s) and the end of the
    read, wait `pause` and read again (at most `attempts` reads).
    Raises ConfigError when the file cannot be read."""
    for _ in range(attempts):
        started = time.time()
        try:
            with open(path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except OSError as exc:
            raise ConfigError(f"open {path}: {exc.strerror}") from None
        if not settle or not started - 1 <= mtime <= time.time():
            break
        time.sleep(pause)
    return data


def load_main_cf(config_dir: str, overrides: Mapping[str, str] | None = None,
                 warn: Callable[[str], None] | None = None,
                 settle: bool = False) -> MainConfig:
    """Read config_dir/main.cf. Syntax errors and a missing file raise
    ConfigError; warnings go to `warn` (default: master.maillog.warning)
    and are kept in MainConfig.warnings. `settle` applies Postfix's
    hot-file rule (re-read a file modified during the last second)."""
    config_dir = os.path.abspath(config_dir)
    path = os.path.join(config_dir, "main.cf")
    collected: list[str] = []

    def note(message: str) -> None:
        collected.append(message)
        if warn is not None:
            warn(message)
        else:
            from master import maillog
            maillog.warning(message)

    data = read_settled(path, settle)
    entries = parse_main_cf(data, path, note)
    return MainConfig(config_dir, path, entries, overrides, collected)


# ---------------------------------------------------------------------------
# master.cf


SERVICE_TYPES = ("unix", "unix-dgram", "inet", "fifo", "pass")
LOCAL_TYPES = ("unix", "unix-dgram", "fifo", "pass")


@dataclass
class Service:
    """One master.cf entry with `-` defaults resolved."""
    name: str
    type: str
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: int
    maxproc: int          # 0 = unlimited
    command: str
    args: list[str]       # argv after the command; `{..}` groups unwrapped
    overrides: dict[str, str]  # from -o, later ones win
    filename: str
    line: int
    wakeup_if_used: bool = False  # wakeup written as `N?`

    def socket_path(self, main: MainConfig) -> str:
        """$queue_directory/private/NAME or .../public/NAME; for inet the
        service name itself (an address)."""
        if self.type == "inet":
            return self.name
        area = "private" if self.private else "public"
        return os.path.join(main.get("queue_directory"), area, self.name)

    def identity(self) -> tuple[str, str]:
        """The master's notion of 'same service': canonical name and type."""
        if self.type in LOCAL_TYPES:
            return (("private/" if self.private else "public/") + self.name, self.type)
        return (self.name, self.type)


def split_command_args(text: str) -> list[str]:
    """Blank-separated tokens; a token starting with `{` runs to its matching
    `}` and is unwrapped (outer braces and blanks just inside removed).
    Raises ConfigError(reason)."""
    tokens = []
    i = 0
    n = len(text)
    while i < n:
        if text[i] in BLANKS:
            i += 1
            continue
        if text[i] == "{":
            close = _find_close(text, i, "{", "}")
            if close < 0:
                raise ConfigError(f"missing '}}' in \"{text[i:]}\"")
            if close + 1 < n and text[close + 1] not in BLANKS:
                raise ConfigError(f"syntax error after '}}' in \"{text[i:]}\"")
            tokens.append(text[i + 1:close].strip(BLANKS))
            i = close + 1
            continue
        start = i
        while i < n and text[i] not in BLANKS:
            i += 1
        tokens.append(text[start:i])
    return tokens


def parse_overrides(args: list[str]) -> dict[str, str]:
    """name -> value of every `-o name=value` (also `-oname=value`) in args;
    blanks around name and value are trimmed. Raises ConfigError(reason)."""
    result: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":
            if i + 1 >= len(args):
                raise ConfigError("option -o requires a name=value argument")
            setting = args[i + 1]
            i += 2
        elif arg.startswith("-o") and len(arg) > 2:
            setting = arg[2:]
            i += 1
        else:
            i += 1
            continue
        name, eq, value = setting.partition("=")
        name = name.strip(BLANKS)
        if not eq or not name or any(c in BLANKS or c in "{}" for c in name):
            raise ConfigError(f"malformed -o option: \"{setting}\" (expected name=value)")
        result[name] = value.strip(BLANKS)
    return result


def _flag(path: str, line: int, field_name: str, value: str, default: bool) -> bool:
    if value == "-":
        return default
    if value in ("y", "n"):
        return value == "y"
    raise _master_error(path, line, f"field \"{field_name}\": bad value: \"{value}\"")


_FIELDS = ("service name", "transport type", "private", "unprivileged", "chroot",
           "wakeup_time", "max_proc", "command")


def parse_master_line(text: str, path: str, line: int, default_process_limit: int,
                      compat_level: tuple[int, int, int],
                      warn: Callable[[str], None]) -> Service:
    """One logical master.cf line -> Service, or ConfigError naming file:line."""
    try:
        tokens = split_command_args(text)
    except ConfigError as exc:
        raise _master_error(path, line, exc.reason) from None
    for index, field_name in enumerate(_FIELDS):
        if index >= len(tokens):
            raise _master_error(path, line, f"missing \"{field_name}\" field")
    name, stype, private, unpriv, chroot, wakeup, maxproc, command = tokens[:8]
    for value, field_name in ((name, "service name"), (stype, "transport type"),
                              (command, "command")):
        if value == "-":
            raise _master_error(path, line, f"field \"{field_name}\" has no default value")
    if stype not in SERVICE_TYPES:
        raise _master_error(path, line, f"bad transport type: {stype}")
    is_private = _flag(path, line, "private", private, True)
    if stype == "inet" and is_private:
        raise _master_error(path, line, "inet service cannot be private")
    is_unpriv = _flag(path, line, "unprivileged", unpriv, True)
    if chroot == "-" and compat_level < (1, 0, 0):
        warn(f"{path}: line {line}: using backwards-compatible default setting chroot=y")
    is_chroot = _flag(path, line, "chroot", chroot, compat_level < (1, 0, 0))
    wake, conditional = 0, False
    if wakeup != "-":
        match = re.fullmatch(r"([0-9]+)(\??)", wakeup)
        if not match:
            raise _master_error(path, line, f"field \"wakeup_time\": bad value: \"{wakeup}\"")
        wake, conditional = int(match.group(1)), bool(match.group(2))
    if maxproc == "-":
        procs = default_process_limit
    elif maxproc.isdigit() and maxproc.isascii():
        procs = int(maxproc)
    else:
        raise _master_error(path, line, f"field \"max_proc\": bad value: \"{maxproc}\"")
    args = tokens[8:]
    try:
        overrides = parse_overrides(args)
    except ConfigError as exc:
        raise _master_error(path, line, exc.reason) from None
    return Service(name=name, type=stype, private=is_private, unpriv=is_unpriv,
                   chroot=is_chroot, wakeup=wake, maxproc=procs, command=command,
                   args=args, overrides=overrides, filename=path, line=line,
                   wakeup_if_used=conditional)


def service_disabled(service: Service, patterns: list[str]) -> bool:
    """master_service_disable: `type` or `name/type` (old `name.type`)
    patterns, `!` negates, first match wins, case-insensitive."""
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        pattern = pattern.lower()
        candidates = (service.type.lower(), f"{service.name}/{service.type}".lower(),
                      f"{service.name}.{service.type}".lower())
        if pattern in candidates:
            return not negate
    return False


def parse_master_cf(data: bytes, path: str, main: MainConfig,
                    warn: Callable[[str], None], strict_duplicates: bool = True
                    ) -> list[Service]:
    """All entries of a master.cf text. A duplicate (name, type) is an error
    when strict_duplicates, else Postfix's warning and the last entry wins."""
    limit = main.get_int("default_process_limit")
    level = main.compatibility_level()
    services: dict[tuple[str, str], Service] = {}
    for number, text in read_logical_lines(data, path, warn):
        service = parse_master_line(text, path, number, limit, level, warn)
        key = service.identity()
        if key in services:
            if strict_duplicates:
                first = services[key]
                raise _master_error(path, number,
                                    f"duplicate master.cf entry for service \"{service.name}\""
                                    f" ({key[0]}) type {service.type}, first at line {first.line}")
            warn(f"duplicate master.cf entry for service \"{service.name}\" ({key[0]})"
                 f" -- using the last entry")
            del services[key]
        services[key] = service
    return list(services.values())


def load_master_cf(config_dir: str, main: MainConfig,
                   warn: Callable[[str], None] | None = None,
                   strict_duplicates: bool = True,
                   apply_disable: bool = True, settle: bool = False,
                   path: str | None = None) -> list[Service]:
    """Read config_dir/master.cf, or `path` (relative to config_dir) when
    given. Entries matched by master_service_disable are left out when
    apply_disable (as the master does); `settle` as for load_main_cf()."""
    path = os.path.join(os.path.abspath(config_dir), path or "master.cf")
    if warn is None:
        from master import maillog
        warn = maillog.warning
    data = read_settled(path, settle)
    services = parse_master_cf(data, path, main, warn, strict_duplicates)
    if apply_disable:
        patterns = main.get_list("master_service_disable")
        services = [s for s in services if not service_disabled(s, patterns)]
    return services


__all__ = ["ConfigError", "MainConfig", "Service", "load_main_cf", "load_master_cf",
           "parse_table_list", "proxy_allow_set", "expand", "split_list", "parse_time",
           "parse_int", "parse_bool", "split_name_value", "split_command_args",
           "parse_overrides", "DEFAULTS"]
