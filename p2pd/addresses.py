"""Host and port handling for IPv4, IPv6 and names, and a check that a listen port is free.

`host_port("::1", 5000)` is `[::1]:5000`: gRPC targets, bind strings and URLs need IPv6 hosts
in brackets; `bare_host("[::1]")` is `::1`, what socket-level APIs take.
"""

from __future__ import annotations

import ipaddress
import re
import socket


def bare_host(host: str) -> str:
    """`[::1]` -> `::1`; anything else unchanged."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_ipv6(host: str) -> bool:
    """Whether `host` (bare or in brackets) is an IPv6 address literal; names and IPv4 are not."""
    try:
        return isinstance(ipaddress.ip_address(bare_host(host)), ipaddress.IPv6Address)
    except ValueError:
        return False


_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):(?P<port>[0-9]{1,5})$")


def is_host_port(address: str) -> bool:
    """Whether `address` is `host:port` (a name, an IPv4 address or a bracketed IPv6 one; port 1 to 65535)."""
    m = _HOST_PORT.fullmatch(address)
    return m is not None and 0 < int(m["port"]) < 65536


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{bare_host(host)}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def tcp_maddr(host: str, port: int) -> str:
    """The libp2p multiaddr of a TCP listen address: /ip4/H/tcp/P, /ip6/H/tcp/P or /dns/H/tcp/P."""
    h = bare_host(host)
    kind = "ip6" if is_ipv6(h) else "ip4" if re.fullmatch(r"[0-9.]+", h) else "dns"
    return f"/{kind}/{h}/tcp/{port}"


def tcp_port_in_use(host: str, port: int) -> bool:
    """Whether binding TCP `host:port` fails because something listens there. Port 0 (any free
    port) is never in use. Binding without SO_REUSEPORT also detects listeners that set it
    (p2pd and gRPC do, and would otherwise share the port silently)."""
    if port == 0:
        return False
    h = bare_host(host)
    family = socket.AF_INET6 if is_ipv6(h) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((h, port))
        except OSError:
            return True
    return False


def maddr_tcp_listen(maddr: str) -> tuple[str, int] | None:
    """(host, port) of an /ip4|ip6/H/tcp/P multiaddr, None for other forms."""
    m = re.fullmatch(r"/ip[46]/([^/]+)/tcp/([0-9]{1,5})(/.*)?", maddr)
    return (m[1], int(m[2])) if m else None


def check_maddr(maddr: str) -> str:
    """`maddr` if it parses as a multiaddr; raises ValueError with one line saying what is wrong (an IPv6 address in
    brackets, as URLs write it, gets the unbracketed form to use)."""
    from multiaddr import Multiaddr

    try:
        Multiaddr(maddr)
    except Exception as e:  # multiaddr raises its own parse error types
        fixed = re.sub(r"/ip6/\[([^\]/]+)\]", r"/ip6/\1", maddr)
        if fixed != maddr:
            raise ValueError(f"{maddr!r}: a multiaddr writes IPv6 without brackets: {fixed}") from None
        raise ValueError(f"{maddr!r} is not a multiaddr ({str(e).split(' (string:')[0]})") from None
    return maddr
