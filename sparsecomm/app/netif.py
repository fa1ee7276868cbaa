"""Which network interface Gloo and NCCL use between nodes (``cluster.socket_ifname``).

Gloo advertises the address this machine's hostname resolves to. Debian's default ``/etc/hosts``
maps the hostname to 127.0.1.1 (other setups to 127.0.0.1): ranks on other nodes are then told
to connect to a loopback address and get "connection refused" or hang. So, per worker, before
the process group is made:

* ``cluster.socket_ifname`` set: ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` are set to it
  (it must exist on this node).
* unset, ``GLOO_SOCKET_IFNAME`` already in the environment: left as the user set it.
* unset, a multi-node world (``WORLD_SIZE`` > ``LOCAL_WORLD_SIZE``) and the hostname resolves only
  to loopback addresses: the interface ``ip route get <rendezvous host>`` names; on the rendezvous
  host itself (that route is ``lo``) the one interface other than ``lo`` that is up with an IPv4
  address. The choice is logged on local rank 0. When neither tells one interface, the worker
  stops with one line naming ``cluster.socket_ifname``.

Nothing crosses the network here; ``ip`` (iproute2) is run once per worker.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping

from .config import ClusterError

ENV_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _error(message: str) -> Exception:
    return ClusterError(message)


def interfaces() -> list[str]:
    """Interface names of this process's network namespace."""
    return [name for _, name in socket.if_nameindex()]


def resolve(host: str) -> list[str]:
    """IPv4/IPv6 addresses ``host`` resolves to here (empty if it does not resolve)."""
    try:
        return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))
    except (socket.gaierror, UnicodeError):
        return []


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def route_dev(addr: str) -> str | None:
    """The interface ``ip route get ADDR`` sends through, or None (no route, no ``ip``)."""
    if shutil.which("ip") is None:
        return None
    out = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True, check=False)
    m = re.search(r"\bdev (\S+)", out.stdout)
    return m.group(1) if out.returncode == 0 and m else None


def up_ipv4_interfaces() -> list[str]:
    """Interfaces other than loopback that are up and have an IPv4 address (``ip -o -4 addr show up``)."""
    if shutil.which("ip") is None:
        return []
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "up"], capture_output=True, text=True, check=False)
    names = []
    for line in out.stdout.splitlines():
        f = line.split()
        if len(f) >= 4 and not is_loopback(f[3].split("/")[0]):
            names.append(f[1].split("@")[0])
    return list(dict.fromkeys(names))


def pick(hostname: str, rdzv_host: str | None) -> tuple[str, str]:
    """(interface, why) for a hostname that resolves to loopback; raises ClusterError if unsure."""
    for addr in resolve(rdzv_host) if rdzv_host else []:
        dev = route_dev(addr)
        if dev and dev != "lo":
            return dev, f"the interface that routes to the rendezvous host {rdzv_host} ({addr})"
    candidates = up_ipv4_interfaces()
    if len(candidates) == 1:
        return candidates[0], (f"the only interface besides lo (the rendezvous host {rdzv_host} is this node)"
                               if rdzv_host else "the only interface besides lo")
    raise _error(
        f"cluster.socket_ifname is not set and this node's hostname {hostname} resolves to loopback "
        f"({', '.join(resolve(hostname)) or 'nothing'}), so other nodes could not reach its ranks, and the "
        f"interface to use cannot be told (route to {rdzv_host or 'the rendezvous host'}: via lo; up interfaces: "
        f"{', '.join(candidates) or 'none'}); set cluster.socket_ifname=<interface>, e.g. "
        f"cluster.socket_ifname={candidates[0] if candidates else 'eth0'}")


def configure(cluster: Mapping, environ: dict | None = None,
              log: Callable[[str], None] | None = None) -> str | None:
    """Set ``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` per the module doc; returns the interface
    chosen (None: Gloo's default, the hostname's address, is fine or this is one node)."""
    environ = os.environ if environ is None else environ
    name = cluster.get("socket_ifname")
    if name:
        have = interfaces()
        if str(name) not in have:
            raise _error(f"cluster.socket_ifname={name}: no such interface on this node "
                         f"({socket.gethostname()} has {', '.join(have)})")
        for var in ENV_VARS:
            environ[var] = str(name)
        return str(name)
    if environ.get("GLOO_SOCKET_IFNAME"):
        return environ["GLOO_SOCKET_IFNAME"]
    world = int(environ.get("WORLD_SIZE", "1"))
    local = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world <= local:
        return None  # one node: loopback is where the peers are
    hostname = socket.gethostname()
    addrs = resolve(hostname)
    if addrs and not all(is_loopback(a) for a in addrs):
        return None
    dev, why = pick(hostname, environ.get("MASTER_ADDR"))
    for var in ENV_VARS:
        environ.setdefault(var, dev)
    if log is None and environ.get("LOCAL_RANK", "0") == "0":
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if log is not None:
        log(f"sparsecomm: cluster.socket_ifname is not set and hostname {hostname} resolves to "
            f"{', '.join(addrs) or 'nothing'} (loopback): using {dev}, {why}")
    return dev
