"""Every main.cf parameter we know, declared once: default, type, bounds, who reads it.

Postfix declares each parameter once, with its default and bounds
(global/mail_params.h and the CONFIG_*_TABLEs of each program); this
module is that table for pyproxymap. A `Parameter` holds a parameter's
facts: its default (Postfix 3.7.11's `postconf -d`, Debian; 3.11.7's where
3.11 changed it or added it), its type (text, integer, long, time with
the unit of a bare number, boolean, list), its bounds, whether a reload
may change it, which of our programs read it, and whether it is our own.
MainConfig's getters, `proxymap-master config -d` and `check` take their
facts from here; a new parameter is one `declare()` call.

The parameters we only know so that `$name` in another default expands as
in Postfix (the many *_maps of proxy_read_maps) are declared in bulk as
text, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

#: parameter types (Postfix's CONFIG_*_TABLE kinds)
TEXT, INT, LONG, TIME, BOOL, LIST = "text", "int", "long", "time", "bool", "list"

#: our programs, as named in `Parameter.readers`
MASTER, WORKER, POSTMAP, TABLES = "proxymap-master", "proxymap", "proxymap-postmap", "tables"


@dataclass(frozen=True)
class Parameter:
    """The facts of one main.cf parameter."""
    name: str
    default: str | None        # None: not a parameter of Postfix 3.7 (see default_311)
    kind: str = TEXT
    unit: str = ""             # TIME: the unit of a bare number
    low: int | None = None     # INT, LONG, TIME: bounds (None: no bound)
    high: int | None = None
    reload: bool = True        # False: a running master keeps its old value until restart
    readers: tuple[str, ...] = ()   # which of our programs read it (empty: only for $name)
    own: bool = False          # pyproxymap's own: Postfix does not know it
    default_311: str | None = None  # 3.11's default where it differs or is new
    dynamic: bool = False      # the default is computed from the host (MainConfig)
    read_only: bool = False    # set by the program, never by main.cf (process_id, process_name)


PARAMETERS: dict[str, Parameter] = {}


def declare(name: str, default: str | None, kind: str = TEXT, **facts) -> Parameter:
    """Add one parameter to PARAMETERS; each name is declared once."""
    if name in PARAMETERS:
        raise ValueError(f"parameter {name} declared twice")
    parameter = Parameter(name, default, kind, **facts)
    PARAMETERS[name] = parameter
    return parameter


# ---------------------------------------------------------------------------
# proxy_read_maps: Postfix 3.7's default, and the 25 parameters 3.11 adds to it

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

# ---------------------------------------------------------------------------
# The parameters we read

# Directories and identity.
declare("config_directory", "/etc/postfix", readers=(MASTER, WORKER, POSTMAP))
declare("queue_directory", "/var/spool/postfix", reload=False, readers=(MASTER, WORKER, POSTMAP))
declare("data_directory", "/var/lib/postfix", readers=(MASTER,))
declare("daemon_directory", "/usr/lib/postfix/sbin")
declare("command_directory", "/usr/sbin", readers=(MASTER, WORKER, POSTMAP))
declare("meta_directory", "/etc/postfix")
declare("shlib_directory", "/usr/lib/postfix")
declare("process_id_directory", "pid")
declare("mail_owner", "postfix", readers=(MASTER, WORKER))    # reload: sockets keep their owner
declare("setgid_group", "postdrop", readers=(MASTER,))
declare("mail_version", "3.7.11")
declare("mail_release_date", "20240304")
declare("compatibility_level", "0", readers=(MASTER, WORKER, POSTMAP))
declare("myhostname", None, dynamic=True, readers=(MASTER, WORKER))
declare("mydomain", None, dynamic=True)
declare("mynetworks", None, dynamic=True)
declare("process_id", None, dynamic=True, read_only=True)
declare("process_name", None, dynamic=True, read_only=True)

# Process management.
declare("daemon_timeout", "18000s", TIME, unit="s", low=1, readers=(MASTER,))
declare("ipc_timeout", "3600s", TIME, unit="s", low=1, readers=(WORKER, POSTMAP))
declare("ipc_idle", "5s", TIME, unit="s", low=1)
declare("ipc_ttl", "1000s", TIME, unit="s", low=1)
declare("max_idle", "100s", TIME, unit="s", low=1, readers=(MASTER, WORKER))
declare("max_use", "100", INT, low=1, readers=(MASTER, WORKER))
declare("default_process_limit", "100", INT, low=1, readers=(MASTER,))
declare("service_throttle_time", "60s", TIME, unit="s", low=1, readers=(MASTER,))
declare("in_flow_delay", "1s", TIME, unit="s", low=0, high=10)
declare("inet_interfaces", "all", readers=(MASTER, WORKER))
declare("inet_protocols", "all", readers=(MASTER, WORKER))
declare("import_environment", ("MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY"
                               " LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"), LIST)
declare("master_service_disable", "", LIST, readers=(MASTER,))

# Logging.
declare("syslog_name", "${multi_instance_name?{$multi_instance_name}:{postfix}}",
        readers=(MASTER, WORKER, POSTMAP))
declare("syslog_facility", "mail")
declare("maillog_file", "", readers=(MASTER, WORKER, POSTMAP))
declare("maillog_file_prefixes", "/var, /dev/stdout", LIST, readers=(MASTER, WORKER, POSTMAP))
declare("postlog_service_name", "postlog")

# Tables.
declare("smtputf8_enable", "${{$compatibility_level} <level {1} ? {no} : {yes}}", BOOL,
        readers=(WORKER, POSTMAP, TABLES))
declare("default_database_type", "hash", readers=(POSTMAP,))
declare("lmdb_map_size", "16777216", LONG, low=1, readers=(TABLES,))
declare("berkeley_db_read_buffer_size", "131072", INT, low=1, readers=(TABLES,))
declare("berkeley_db_create_buffer_size", "16777216", INT, low=1, readers=(TABLES,))
declare("proxymap_service_name", "proxymap", readers=(MASTER, WORKER))
declare("proxywrite_service_name", "proxywrite", readers=(MASTER, WORKER, POSTMAP))
declare("proxy_read_maps", PROXY_READ_MAPS_DEFAULT, LIST, readers=(MASTER, WORKER),
        default_311=PROXY_READ_MAPS_DEFAULT_311)
declare("proxy_write_maps", ("$smtp_sasl_auth_cache_name $lmtp_sasl_auth_cache_name"
                             " $address_verify_map $postscreen_cache_map"), LIST,
        readers=(MASTER, WORKER))
declare("smtpd_restriction_classes", None, LIST, readers=(WORKER,), default_311="")

# Our own: limits of the attribute codec (proxymap/protocol.py): attributes
# in one request (far above the 6 a request can carry), bytes in one list.
declare("proxymap_max_attributes", "32", INT, low=1, readers=(WORKER,), own=True)
declare("proxymap_max_request_size", "1048576", LONG, low=1, readers=(WORKER,), own=True)
# Our own: open connections at which a worker counts as busy; the master
# starts another worker when every worker of a service is busy.
declare("proxymap_worker_busy_clients", "32", INT, low=1, readers=(MASTER, WORKER), own=True)
# Our own: workers the master keeps per service when idle, by the
# service's role (master/policy.py): the read service is pre-forked, the
# write service's first worker starts when a client connects (as Postfix's
# master starts every service) and leaves after max_idle.
declare("proxymap_read_min_workers", "1", INT, low=0, readers=(MASTER,), own=True)
declare("proxymap_write_min_workers", "0", INT, low=0, readers=(MASTER,), own=True)
# Our own: the master.cf-format file proxymap-master takes its services
# from (beside Postfix's master, a file of its own; -m FILE overrides).
declare("proxymap_master_cf", "$config_directory/master.cf", readers=(MASTER,), own=True)
# Our own: lanes of threads for tables that wait on a server
# (proxymap/offload.py): threads per table, requests that may wait for
# them, seconds before an unanswered request is answered RETRY.
declare("proxymap_backend_threads", "4", INT, low=1, readers=(WORKER, TABLES), own=True)
declare("proxymap_backend_queue", "64", INT, low=1, readers=(WORKER,), own=True)
declare("proxymap_backend_timeout", "10s", TIME, unit="s", low=1, readers=(WORKER,), own=True)
# Our own: the Postfix release whose defaults and allow-list rules apply
# (3.11+: its longer proxy_read_maps, tables named in /file/name values
# and restriction classes); "auto" asks the installed postconf(1).
declare("proxymap_postfix_version", "auto", readers=(MASTER, WORKER, POSTMAP), own=True)
# Our own: bounded work per client connection (proxymap/server.py):
# decoded requests waiting for an answer, reply bytes unsent before the
# next reply is made, BAD replies before the connection is closed (0:
# never).
declare("proxymap_max_pipelined_requests", "16", INT, low=1, readers=(WORKER,), own=True)
declare("proxymap_max_unsent_reply_bytes", "65536", INT, low=1, readers=(WORKER,), own=True)
declare("proxymap_max_bad_requests", "10", INT, low=0, readers=(WORKER,), own=True)
# Our own: the per-table cache of recent answers (proxymap/answercache.py):
# entries and bytes (keys plus replies) per table instance of a worker (0
# entries: no cache), and tables (type:name) answered without one.
declare("proxymap_answer_cache_entries", "10000", INT, low=0, readers=(WORKER,), own=True)
declare("proxymap_answer_cache_bytes", "4194304", INT, low=1, readers=(WORKER,), own=True)
declare("proxymap_answer_cache_exclude", "", LIST, readers=(WORKER,), own=True)
# Our own: how long the answer cache keeps a remote table's answers (tables
# served off the event loop: pgsql, mysql, sqlite, ldap, memcache, redis,
# socketmap, tcp, plugins). 0 = not cached: nothing tells a worker of a
# change made elsewhere, so only a time bounds how stale an answer can be.
declare("proxymap_remote_cache_ttl", "0s", TIME, unit="s", low=0, readers=(WORKER,), own=True)
declare("proxymap_remote_cache_negative_ttl", "0s", TIME, unit="s", low=0, readers=(WORKER,),
        own=True)
# Our own: the Prometheus listener (master/exporter.py): empty = none, an
# absolute UNIX socket path, or a loopback host:port (port 0: any).
declare("proxymap_metrics_listen", "", readers=(MASTER,), own=True)

# ---------------------------------------------------------------------------
# Parameters known only for `$name` expansion and `config -d`: what
# proxy_read_maps and proxy_write_maps refer to (postconf -d of 3.7.11) ...

_REFERENCED_DEFAULTS = {
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
}
_EMPTY_DEFAULTS = """
    body_checks canonical_maps debugger_command default_delivery_status_filter
    fallback_transport_maps header_checks lmtp_body_checks
    lmtp_discard_lhlo_keyword_address_maps lmtp_dns_reply_filter lmtp_generic_maps
    lmtp_header_checks lmtp_mime_header_checks lmtp_nested_header_checks
    lmtp_pix_workaround_maps lmtp_reply_filter lmtp_sasl_auth_cache_name
    lmtp_sasl_password_maps lmtp_tls_policy_maps mailbox_command_maps
    mailbox_transport_maps milter_header_checks
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
for _name, _default in [*_REFERENCED_DEFAULTS.items(), *((n, "") for n in _EMPTY_DEFAULTS)]:
    declare(_name, _default)

# ... and what 3.11's longer proxy_read_maps adds (postconf -d of 3.11.7).
_DEFAULTS_ADDED_311 = dict.fromkeys(PROXY_READ_MAPS_ADDED_311, "")
_DEFAULTS_ADDED_311.update({
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
})
for _name, _default in _DEFAULTS_ADDED_311.items():
    declare(_name, None, default_311=_default)

# ---------------------------------------------------------------------------
# Views of the declarations

#: name -> `postconf -d` default of 3.7 (host-dependent ones left out)
DEFAULTS: dict[str, str] = {p.name: p.default for p in PARAMETERS.values()
                            if p.default is not None}
#: name -> 3.11's default, for the parameters whose 3.11 default differs or is new
DEFAULTS_311: dict[str, str] = {p.name: p.default_311 for p in PARAMETERS.values()
                                if p.default_311 is not None}
#: parameters of this project that Postfix does not know
OWN_PARAMETERS = tuple(p.name for p in PARAMETERS.values() if p.own)
