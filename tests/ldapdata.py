"""The directory, parameter files and probe keys of the ldap: tests.

A small schema of our own (OpenLDAP's experimental arc 1.3.6.1.4.1.4203.666)
gives Postfix's default attributes (mailacceptinggeneralid, maildrop) and
the ones the terminal/leaf/URL tests need; the entries exercise plain and
multi-valued attributes, DN recursion (with a DN that is not there, a
nested group and a loop), LDAP URL values, terminal and leaf attributes
(also across two entries found by one search), keys with the filter and
DN specials `*()\\,` and non-ASCII keys.
"""

import base64

SUFFIX = "dc=example,dc=com"
OID = "1.3.6.1.4.1.4203.666.11.90"

SCHEMA = "\n".join([
    f"attributetype ( {OID}.1 NAME 'mailacceptinggeneralid' EQUALITY caseIgnoreMatch"
    " SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
    f"attributetype ( {OID}.2 NAME 'maildrop' EQUALITY caseIgnoreMatch"
    " SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
    f"attributetype ( {OID}.3 NAME 'pmTerminal' EQUALITY caseIgnoreMatch"
    " SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
    f"attributetype ( {OID}.4 NAME 'pmLeaf' EQUALITY caseIgnoreMatch"
    " SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
    f"attributetype ( {OID}.5 NAME 'pmMemberURL' EQUALITY caseExactMatch"
    " SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )",
    f"attributetype ( {OID}.6 NAME 'pmMember' SUP distinguishedName )",
    f"objectclass ( {OID}.10 NAME 'pmMailbox' SUP top AUXILIARY MAY ( mailacceptinggeneralid"
    " $ maildrop $ pmTerminal $ pmLeaf $ pmMemberURL $ pmMember $ mail $ cn $ uid ) )",
    f"objectclass ( {OID}.11 NAME 'pmEntry' SUP top STRUCTURAL MUST cn )",
])


def entry(dn: str, *attrs: tuple[str, str], classes=("pmEntry", "pmMailbox")) -> str:
    lines = [f"dn: {dn}"] + [f"objectClass: {c}" for c in classes]
    for name, value in attrs:
        if value.isascii() and not value.startswith((" ", ":", "<")):
            lines.append(f"{name}: {value}")
        else:   # base64 for non-ASCII values (LDIF)
            lines.append(f"{name}:: {base64.b64encode(value.encode()).decode()}")
    return "\n".join(lines) + "\n"


PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"

LDIF = "\n".join([
    f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
    f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
    f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
    entry(f"cn=alice,{PEOPLE}", ("cn", "alice"), ("uid", "alice"),
          ("mailacceptinggeneralid", "alice@example.com"), ("mail", "alice@example.com"),
          ("maildrop", "alice@mail.example.com"), ("maildrop", "alice2@mail.example.com")),
    entry(f"cn=bob,{PEOPLE}", ("cn", "bob"), ("uid", "bob"),
          ("mailacceptinggeneralid", "bob@example.com"),
          ("mailacceptinggeneralid", "bob@example.net"), ("maildrop", "bob@mail.example.com")),
    entry(f"cn=carol,{PEOPLE}", ("cn", "carol"), ("uid", "carol"),
          ("mailacceptinggeneralid", "carol@sub.example.org"),
          ("maildrop", "carol@elsewhere.net")),
    entry(f"cn=star,{PEOPLE}", ("cn", "star"), ("mailacceptinggeneralid", "st*r@example.com"),
          ("maildrop", "literal star")),
    entry(f"cn=paren,{PEOPLE}", ("cn", "paren"),
          ("mailacceptinggeneralid", "(paren)@example.com"), ("maildrop", "literal parens")),
    entry(f"cn=backslash,{PEOPLE}", ("cn", "backslash"),
          ("mailacceptinggeneralid", "back\\slash@example.com"), ("maildrop", "literal backslash")),
    entry(f"cn=a\\2Cb,{PEOPLE}", ("cn", "a,b"), ("uid", "a,b"), ("maildrop", "comma in a DN")),
    entry(f"cn=mueller,{PEOPLE}", ("cn", "mueller"), ("uid", "müller"),
          ("mailacceptinggeneralid", "müller@例え.jp"), ("maildrop", "umlaut")),
    entry(f"cn=term,{PEOPLE}", ("cn", "term"), ("mailacceptinggeneralid", "term@example.com"),
          ("pmTerminal", "terminal value"), ("maildrop", "hidden by the terminal"),
          ("member", f"cn=alice,{PEOPLE}"), ("pmMember", f"cn=alice,{PEOPLE}"),
          classes=("groupOfNames", "pmMailbox")),
    # two entries for one key: the first terminal, the second without the attribute
    entry(f"cn=shared1,{PEOPLE}", ("cn", "shared1"),
          ("mailacceptinggeneralid", "shared@example.com"), ("pmTerminal", "shared terminal"),
          ("maildrop", "shared1 drop")),
    entry(f"cn=shared2,{PEOPLE}", ("cn", "shared2"),
          ("mailacceptinggeneralid", "shared@example.com"), ("maildrop", "shared2 drop"),
          ("pmLeaf", "shared2 leaf")),
    entry(f"cn=subgroup,{GROUPS}", ("cn", "subgroup"),
          ("mailacceptinggeneralid", "subgroup@example.com"), ("pmMember", f"cn=carol,{PEOPLE}"),
          ("pmLeaf", "subgroup leaf"), ("maildrop", "subgroup-owner@example.com")),
    entry(f"cn=staff,{GROUPS}", ("cn", "staff"), ("mailacceptinggeneralid", "staff@example.com"),
          ("maildrop", "staff-list@example.com"), ("pmLeaf", "staff leaf"),
          ("pmMember", f"cn=alice,{PEOPLE}"), ("pmMember", f"cn=bob,{PEOPLE}"),
          ("pmMember", f"cn=nobody,{PEOPLE}"), ("pmMember", f"cn=subgroup,{GROUPS}")),
    entry(f"cn=loop,{GROUPS}", ("cn", "loop"), ("mailacceptinggeneralid", "loop@example.com"),
          ("maildrop", "loop-owner"), ("pmMember", f"cn=loop,{GROUPS}")),
    entry(f"cn=urls,{GROUPS}", ("cn", "urls"), ("mailacceptinggeneralid", "urls@example.com"),
          ("pmMemberURL", f"ldap:///{PEOPLE}?maildrop?one?(uid=bob)"),
          ("pmMemberURL", f"ldap:///{PEOPLE}?cn?one?(uid=carol)"),
          ("pmMemberURL", f"ldap:///cn=alice,{PEOPLE}")),
    entry(f"cn=leafonly,{GROUPS}", ("cn", "leafonly"),
          ("mailacceptinggeneralid", "leafonly@example.com"), ("pmLeaf", "a leaf value")),
])

#: parameter files (server_host, search_base and version are added per test)
CONFIGS = {
    "plain": "",
    # ours: the answer cache's settings, which Postfix's ldap table ignores
    "cached": ("proxymap_cache_ttl = 1h\nproxymap_cache_negative_ttl = 3600\n"
               "proxymap_cache_entries = 100\n"),
    "multi": "result_attribute = maildrop, mail\n",
    "special": "special_result_attribute = pmMember pmMemberURL\n",
    "terminal": ("terminal_result_attribute = pmTerminal\n"
                 "special_result_attribute = member, pmMember\n"),
    "leaf": "leaf_result_attribute = pmLeaf\nspecial_result_attribute = pmMember\n",
    "recursion": "special_result_attribute = pmMember\nrecursion_limit = 2\n",
    "domain": "domain = example.com, !sub.example.org, EXAMPLE.NET\n",
    "format": ("query_filter = (&(uid=%u)(mailacceptinggeneralid=*@%d))\n"
               "result_format = <%s> for %U at %D\n"),
    "labels": "query_filter = (mailacceptinggeneralid=*@%2.%1)\nexpansion_limit = 3\n",
    "sizelimit": "query_filter = (mailacceptinggeneralid=*@%d)\nsize_limit = 2\n",
    "dynbase": (f"search_base = cn=%u,{PEOPLE}\nscope = base\nquery_filter = (objectClass=*)\n"
                "result_attribute = maildrop\n"),
    "fixedbase": f"search_base = ou=nowhere,{SUFFIX}\n",
    "one": f"search_base = {GROUPS}\nscope = one\n",
    "filter": "query_filter = uid=%s\nresult_attribute = maildrop cn\n",
    "nobind": "bind = no\n",
    "rootbind": f"bind_dn = cn=admin,{SUFFIX}\nbind_pw = secret\n",
    "badbind": f"bind_dn = cn=admin,{SUFFIX}\nbind_pw = wrong\n",
    "version2": "version = 2\n",
    "badfilter": "query_filter = (mailacceptinggeneralid=%s\n",
}

KEYS = ["alice@example.com", "ALICE@Example.COM", "bob@example.com", "bob@example.net",
        "carol@sub.example.org", "st*r@example.com", "*", "*@example.com",
        "(paren)@example.com", "back\\slash@example.com", "a,b", "alice)(uid=*",
        "müller@例え.jp", "Müller@例え.jp", "term@example.com", "shared@example.com",
        "staff@example.com", "subgroup@example.com", "urls@example.com",
        "leafonly@example.com", "missing@example.com", "plain", "alice", "@example.com",
        "nobody@", "x@com", "dave@Sub.Example.NET"]
