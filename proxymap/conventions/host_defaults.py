"""Defaults Postfix computes from the host: myhostname, mydomain, mynetworks.

As Postfix's mail_params.c does: myhostname is gethostname() (made fully
qualified with `.localdomain`), mydomain what follows its first dot, and
mynetworks the host's interface networks in the mynetworks_style.
"""

from __future__ import annotations

import ipaddress
import socket


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
