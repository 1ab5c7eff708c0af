"""The main.cf parameters we know: their `postconf -d` defaults and limits.

Postfix declares each parameter once, with its default and bounds
(global/mail_params.h and the CONFIG_*_TABLEs of each program); this
module is that table for pyproxymap: Postfix 3.7.11's defaults (Debian)
for the parameters this project reads and everything their defaults refer
to, 3.11.7's where 3.11 changed them, and the parameters of our own.
"""

from __future__ import annotations

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
    "proxymap_max_attributes": "32",            # far above the 6 a request can carry
    "proxymap_max_request_size": "1048576",     # bytes in one attribute list
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
})

#: parameters of this project that Postfix does not know
OWN_PARAMETERS = ("proxymap_max_attributes", "proxymap_max_request_size",
                  "proxymap_worker_busy_clients", "proxymap_master_cf",
                  "proxymap_backend_threads", "proxymap_backend_queue", "proxymap_backend_timeout",
                  "proxymap_postfix_version",
                  "proxymap_max_pipelined_requests", "proxymap_max_unsent_reply_bytes",
                  "proxymap_max_bad_requests")

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

