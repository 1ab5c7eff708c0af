"""ldap: through our proxy against Postfix's own C client on one slapd.

The suite starts its own slapd (slapd.conf and an mdb database in a
temporary directory, an ldapi:// socket there and a loopback port the
kernel picked, stopped by pid; tests/servers.py) and loads the entries of
tests/ldapdata.py. Real `postmap -q` (Debian's postfix-ldap, Postfix 3.7)
queries each parameter file directly (`ldap:FILE`) and through our worker
(`proxy:ldap:FILE`): same output, same exit codes, for every key of the
corpus. Then the pure functions directly, 64 clients sharing a few
connections, and slapd stopped under load: RETRY while a file table
keeps answering, recovery once it is back, with the same worker.
"""

import pytest

from ldapdata import CONFIGS, KEYS, LDIF, SCHEMA, SUFFIX
from servers import SlapdServer, find_slapd, free_loopback_port
from sqldata import assert_same_answers, both, check_outage_and_recovery, check_pool_bound
from worker_fixture import WorkerInstance
from proxymap import dictflags as F
from proxymap.tables import open_table
from proxymap.tables.base import TableError, TableOpenError
from proxymap.tables.ldap import (attrdesc_subtype, dn_quote, filter_quote, is_ldap_url,
                                  parse_search_url, parse_server_url, server_urls, url_attrs)

pytestmark = pytest.mark.skipif(find_slapd() is None,
                                reason="slapd is not installed (apt-get install slapd ldap-utils)")


@pytest.fixture(scope="module")
def slapd():
    with SlapdServer(SCHEMA, tls=True) as server:
        server.add(LDIF)
        yield server


def write_cfs(inst, server, configs, host=None, extra=""):
    specs = {}
    for name, body in configs.items():
        cf = f"{inst.config_dir}/ldap-{name}.cf"
        with open(cf, "w", encoding="utf-8") as f:
            f.write(f"server_host = {host or server.ldapi_url}\nsearch_base = {SUFFIX}\n"
                    f"{extra}{body}")
        specs[name] = f"ldap:{cf}"
    return specs


@pytest.fixture(scope="module")
def inst(slapd, tmp_path_factory):
    i = WorkerInstance(tmp_path_factory.mktemp("ldap"))
    i.cfs = write_cfs(i, slapd, CONFIGS)
    dead = free_loopback_port()          # nothing listens there: the next URL is used
    i.cfs.update(write_cfs(i, slapd, {"tcp": ""}, host=f"127.0.0.1:{slapd.port}"))
    i.cfs.update(write_cfs(i, slapd, {"port": f"server_port = {slapd.port}\n"},
                           host="127.0.0.1"))
    i.cfs.update(write_cfs(i, slapd, {"failover": ""},
                           host=f"ldap://127.0.0.1:{dead}, {slapd.tcp_url}/"))
    i.cfs.update(write_cfs(i, slapd, {"down": ""}, host=f"ldap://127.0.0.1:{dead}"))
    # version 2 stays 2 with ldap:// only (ldapi:// makes it 3), and slapd 2.5 refuses it
    i.cfs.update(write_cfs(i, slapd, {"version2tcp": CONFIGS["version2"]},
                           host=f"127.0.0.1:{slapd.port}"))
    # TLS: slapd's certificate is self-signed for 127.0.0.1 (its own CA)
    tcp, ldaps = f"127.0.0.1:{slapd.port}", f"ldaps://127.0.0.1:{slapd.ldaps_port}/"
    trusted = f"tls_require_cert = yes\ntls_ca_cert_file = {slapd.cert}\n"
    untrusted = "tls_require_cert = yes\n"            # the system's CAs do not know it
    for name, host, body in (("starttls", tcp, "start_tls = yes\n"),
                             ("starttls_verified", tcp, "start_tls = yes\n" + trusted),
                             ("starttls_untrusted", tcp, "start_tls = yes\n" + untrusted),
                             ("ldaps", ldaps, ""), ("ldaps_verified", ldaps, trusted),
                             ("ldaps_untrusted", ldaps, untrusted)):
        i.cfs.update(write_cfs(i, slapd, {name: body}, host=host))
    i.write_main_cf(read_maps=" ".join(f"proxy:{s}" for s in i.cfs.values()))
    i.start("proxymap")
    yield i
    i.stop()


def outcome(result):
    """What a postmap run showed: exit code, output, whether it gave up."""
    return result.returncode, result.stdout, b"fatal:" in result.stderr


def answer(inst, table, key):
    direct, proxied = both(inst, key, inst.cfs[table])
    assert outcome(proxied) == outcome(direct), (table, key, direct, proxied,
                                                 inst.log()[-2000:])
    return proxied.returncode, proxied.stdout.decode().strip()


#: tables that answer every key of the corpus without an error: compared
#: with one `postmap -q -` run per side for all keys
BATCH_TABLES = sorted(set(CONFIGS) - {"recursion", "labels", "sizelimit", "fixedbase",
                                      "badbind", "badfilter"}
                      | {"tcp", "port", "failover", "starttls", "starttls_verified", "ldaps",
                         "ldaps_verified"})
#: tables where some or all keys are a temporary error (postmap stops at
#: the first): compared key by key on a few keys
ERROR_TABLES = {
    "recursion": ["alice@example.com", "staff@example.com", "subgroup@example.com"],
    "labels": ["alice@example.com", "plain", "x@com"],
    "sizelimit": ["alice@example.com", "carol@sub.example.org", "plain"],
    "fixedbase": ["alice@example.com"], "badbind": ["bob@example.com"],
    "version2tcp": ["bob@example.com"], "badfilter": ["bob@example.com"],
    "down": ["bob@example.com", "plain"],
    "special": ["loop@example.com"],
    "starttls_untrusted": ["bob@example.com"], "ldaps_untrusted": ["bob@example.com"],
}


@pytest.mark.parametrize("table", BATCH_TABLES)
def test_every_key_answers_like_postfix(inst, table):
    keys = "\n".join(KEYS).encode() + b"\ncaf\xe9@example.com\n"   # and one not UTF-8
    direct = inst.postmap("-q", "-", inst.cfs[table], input=keys)
    proxied = inst.postmap("-q", "-", f"proxy:{inst.cfs[table]}", input=keys)
    assert outcome(proxied) == outcome(direct), (table, direct, proxied,
                                                 inst.log()[-2000:])
    assert direct.returncode == 0 and direct.stdout, (table, direct)


@pytest.mark.parametrize("table", sorted(ERROR_TABLES))
def test_temporary_errors_like_postfix(inst, table):
    for key in ERROR_TABLES[table]:
        answer(inst, table, key)


def test_known_answers(inst):
    """What the comparisons above must have seen (so they prove something)."""
    def get(table, key):
        return answer(inst, table, key)

    assert get("plain", "ALICE@Example.COM") == (0, "alice@mail.example.com,"
                                                    "alice2@mail.example.com")
    assert get("plain", "st*r@example.com") == (0, "literal star")
    assert get("plain", "*")[0] == 1                          # escaped, not a wildcard
    assert get("plain", "back\\slash@example.com") == (0, "literal backslash")
    assert get("plain", "(paren)@example.com") == (0, "literal parens")
    assert get("plain", "alice)(uid=*")[0] == 1
    assert get("plain", "müller@例え.jp") == (0, "umlaut")
    # DN recursion: alice, bob, the missing DN skipped, the nested group
    code, text = get("special", "staff@example.com")
    assert code == 0 and set(text.split(",")) == {
        "staff-list@example.com", "alice@mail.example.com", "alice2@mail.example.com",
        "bob@mail.example.com", "carol@elsewhere.net", "subgroup-owner@example.com"}
    assert get("special", "urls@example.com") == (0, "bob@mail.example.com,"
                                                     "alice@mail.example.com,"
                                                     "alice2@mail.example.com")
    assert get("terminal", "term@example.com") == (0, "terminal value")
    assert get("terminal", "shared@example.com") == (0, "shared terminal")
    assert get("leaf", "leafonly@example.com") == (0, "a leaf value")
    assert "staff leaf" not in get("leaf", "staff@example.com")[1]
    assert get("format", "bob@example.com") == (0, "<bob@mail.example.com> for bob at"
                                                   " example.com")
    assert get("dynbase", "a,b") == (0, "comma in a DN")
    assert get("dynbase", "missing@example.com")[0] == 1     # no such base: not found
    assert get("domain", "carol@sub.example.org")[0] == 1
    # the entry's attributes in the server's order (cn was stored first)
    assert get("filter", "alice") == (0, "alice,alice@mail.example.com,"
                                         "alice2@mail.example.com")
    assert get("failover", "bob@example.com") == (0, "bob@mail.example.com")
    assert get("rootbind", "bob@example.com") == (0, "bob@mail.example.com")
    for table in ("starttls", "starttls_verified", "ldaps", "ldaps_verified"):
        assert get(table, "bob@example.com") == (0, "bob@mail.example.com"), table
    for table, keys in ERROR_TABLES.items():     # each has at least one temporary error
        assert any(b"fatal:" in both(inst, key, inst.cfs[table])[1].stderr
                   for key in keys), table


def test_log_has_postfix_warnings_and_no_traceback(inst):
    for table, key in (("special", "staff@example.com"), ("fixedbase", "bob@example.com"),
                       ("badbind", "bob@example.com"), ("special", "loop@example.com"),
                       ("starttls_untrusted", "bob@example.com")):
        both(inst, key, inst.cfs[table])
    log = inst.log()
    assert "Traceback" not in log
    assert f"DN cn=nobody,ou=people,{SUFFIX} not found, skipping" in log
    assert f"Search base 'ou=nowhere,{SUFFIX}' not found: 32: No such object" in log
    assert "with dn cn=admin,dc=example,dc=com: 49 (Invalid credentials)" in log
    assert "error: dict_ldap_connect: Unable to set STARTTLS: -11: Connect error" in log
    # 1000 levels deep, as Postfix counts them, without Python's recursion limit
    assert ("dict_ldap_get_values[1000]: " in log and "Recursion limit exceeded for special"
            f" attribute pmMember=cn=loop,ou=groups,{SUFFIX}" in log)


def test_64_clients_share_a_few_connections(slapd, tmp_path):
    i = WorkerInstance(tmp_path)
    # the key and value check_pool_bound() looks up, alone under a base of its own
    slapd.add(f"dn: cn=pool,{SUFFIX}\nobjectClass: pmEntry\nobjectClass: pmMailbox\n"
              "cn: pool\nmailacceptinggeneralid: alice@example.com\n"
              "maildrop: alice.local@mail.example.com\n")
    specs = write_cfs(i, slapd, {"pool": f"search_base = cn=pool,{SUFFIX}\n"},
                      host=f"{slapd.tcp_url}/")
    held = check_pool_bound(i, specs["pool"], lambda: slapd.connections_from(i.procs[0].pid))
    print(f"FIGURES ldap: 64 clients x 3 lookups through one worker held {held}"
          f" directory connections (proxymap_backend_threads = 3)")


def test_directory_down_under_load_answers_retry_and_recovers(slapd, tmp_path):
    i = WorkerInstance(tmp_path)
    slapd.add(f"dn: cn=fault,{SUFFIX}\nobjectClass: pmEntry\nobjectClass: pmMailbox\n"
              "cn: fault\nmailacceptinggeneralid: alice@example.com\n")
    specs = write_cfs(i, slapd, {"fault": f"result_attribute = cn\nsearch_base = cn=fault,"
                                          f"{SUFFIX}\n"})
    check_outage_and_recovery(i, specs["fault"], slapd, "Can't contact LDAP server")


# -- pure functions --------------------------------------------------------------------

def test_key_escaping():
    assert filter_quote("a*b(c)d\\e") == "a\\2Ab\\28c\\29d\\5Ce"
    assert filter_quote("müller@例え.jp") == "müller@例え.jp"
    assert dn_quote('a,b+c;d<e>f"g#h i\\') == "a\\2Cb\\2Bc\\3Bd\\3Ce\\3Ef\\22g\\23h\\20i\\5C"


def test_server_urls_and_addresses():
    assert server_urls("ldap.example.com, 10.0.0.1:1389 ldapi://%2Frun%2Fs", 3890) == [
        "ldap://ldap.example.com:3890", "ldap://10.0.0.1:1389", "ldapi://%2Frun%2Fs"]
    a = parse_server_url("ldapi://%2Frun%2Fslapd%2Fldapi")
    assert (a.scheme, a.socket_path) == ("ldapi", "/run/slapd/ldapi")
    a = parse_server_url("LDAPS://[::1]/")
    assert (a.scheme, a.host, a.port) == ("ldaps", "::1", 636)
    a = parse_server_url("ldap://")
    assert (a.host, a.port) == ("localhost", 389)
    for bad in ("ldap://host:0/", "ldap://host:x", "http://host"):
        with pytest.raises(ValueError):
            parse_server_url(bad)


def test_search_urls():
    u = parse_search_url("ldap:///ou=people,dc=example,dc=com?maildrop,cn?one?(uid=bob)")
    assert (u.base, u.attributes, u.scope, u.filter) == (
        "ou=people,dc=example,dc=com", ["maildrop", "cn"], "one", "(uid=bob)")
    u = parse_search_url("<URL:ldap://h/cn=a%3Fb,dc=x>")
    assert (u.base, u.attributes, u.scope, u.filter) == ("cn=a?b,dc=x", [], "base",
                                                         "(objectClass=*)")
    with pytest.raises(ValueError):
        parse_search_url("ldap:///dc=x??middle")
    assert is_ldap_url("LDAP://x/") and is_ldap_url("<ldapi:///>") and not is_ldap_url("cn=x")


def test_attribute_options_and_url_attributes():
    assert attrdesc_subtype("mail", "MAIL") == 1
    assert attrdesc_subtype("mail", "mail;lang-en") == 1
    assert attrdesc_subtype("mail;lang-en", "mail") == -1
    assert attrdesc_subtype("mail", "mailbox") == 0
    ours = ["maildrop", "mail"]
    assert url_attrs([], ours) == ours
    assert url_attrs(["mail;lang-de", "cn"], ours) == ["mail;lang-de"]
    assert url_attrs(["cn"], ours) is None


def test_parameter_errors_and_open_warnings(tmp_path, caplog):
    cf = tmp_path / "x.cf"
    cf.write_text("bind = sasl\n")
    with pytest.raises(TableOpenError, match="unsupported parameter value: bind = sasl"):
        open_table(f"ldap:{cf}", F.FOLD_FIX, False, {})
    cf.write_text("timeout = ten\n")
    with pytest.raises(TableOpenError, match="bad numerical configuration: timeout = ten"):
        open_table(f"ldap:{cf}", F.FOLD_FIX, False, {})
    with pytest.raises(TableOpenError, match="requires O_RDONLY"):
        open_table(f"ldap:{cf}", 0, True, {})
    cf.write_text("query_filter = (cn=x)\nscope = deep\nversion = 7\ndereference = 9\n"
                  "search_base = dc=x\nserver_host = ldapi://%2Fnonexistent\n")
    table = open_table(f"ldap:{cf}", F.FOLD_FIX, False, {})
    err = caplog.text
    assert f"dict_ldap_open: {cf}: Fixed query_filter (cn=x) is probably useless" in err
    assert "Unrecognized value deep specified for scope; using sub" in err
    assert "Unknown version 7, using 3." in err
    assert "Unrecognized value 9 specified for dereference; using 0" in err
    with pytest.raises(TableError):            # nothing listens: RETRY, no traceback
        table.lookup(b"x")
    table.close()


def test_main_cf_prefixed_parameters(slapd):
    params = {"ldapone_server_host": slapd.ldapi_url, "ldapone_search_base": SUFFIX,
              "ldapone_result_attribute": "cn", "ldapone_query_filter": "(uid=%u)"}
    table = open_table("ldap:ldapone", F.FOLD_FIX, False, params)
    try:
        assert table.lookup(b"Carol@anywhere") == b"carol"
        assert table.lookup(b"nobody") is None
    finally:
        table.close()
