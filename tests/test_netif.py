"""cluster.socket_ifname and the interface pick for multi-node jobs (sparsecomm/app/netif.py).

The machine's own name resolution and routes are replaced by fakes here; the real thing, on
emulated nodes whose hostname resolves to 127.0.1.1, is in test_box.py.
"""
from __future__ import annotations

import pytest

from sparsecomm.app import netif
from sparsecomm.app.launch import ClusterError

MULTI = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "head"}


@pytest.fixture
def machine(monkeypatch):
    """A node named ``n2`` whose name resolution, routes and interfaces the test sets."""
    facts = {"hosts": {"n2": ["127.0.1.1"], "head": ["10.0.0.1"]}, "routes": {"10.0.0.1": "eth0"},
             "up": ["eth0"], "ifaces": ["lo", "eth0"]}
    monkeypatch.setattr(netif.socket, "gethostname", lambda: "n2")
    monkeypatch.setattr(netif, "resolve", lambda h: facts["hosts"].get(h, []))
    monkeypatch.setattr(netif, "route_dev", lambda a: facts["routes"].get(a))
    monkeypatch.setattr(netif, "up_ipv4_interfaces", lambda: list(facts["up"]))
    monkeypatch.setattr(netif, "interfaces", lambda: list(facts["ifaces"]))
    return facts


def test_setting_sets_both_variables(machine):
    env = dict(MULTI)
    assert netif.configure({"socket_ifname": "eth0"}, env) == "eth0"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth0"


def test_setting_names_a_missing_interface(machine):
    with pytest.raises(ClusterError, match=r"cluster.socket_ifname=ib0: no such interface .* has lo, eth0"):
        netif.configure({"socket_ifname": "ib0"}, dict(MULTI))


def test_one_node_needs_nothing(machine):
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    assert netif.configure({}, env) is None
    assert "GLOO_SOCKET_IFNAME" not in env


def test_routable_hostname_needs_nothing(machine):
    machine["hosts"]["n2"] = ["10.0.0.2"]
    env = dict(MULTI)
    assert netif.configure({}, env) is None and "GLOO_SOCKET_IFNAME" not in env


def test_users_variable_is_kept(machine):
    env = dict(MULTI, GLOO_SOCKET_IFNAME="bond0")
    assert netif.configure({}, env) == "bond0"
    assert env["GLOO_SOCKET_IFNAME"] == "bond0" and "NCCL_SOCKET_IFNAME" not in env


def test_loopback_hostname_takes_the_route_to_the_rendezvous_host(machine):
    machine["up"] = ["eth0", "eth1"]  # two candidates: the route decides
    machine["routes"]["10.0.0.1"] = "eth1"
    said = []
    env = dict(MULTI)
    assert netif.configure({}, env, log=said.append) == "eth1"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth1"
    assert len(said) == 1 and "127.0.1.1" in said[0] and "routes to the rendezvous host head" in said[0]


def test_rendezvous_host_itself_takes_its_only_interface(machine):
    machine["hosts"]["head"] = ["127.0.1.1"]  # this node is the head: its route is lo
    machine["routes"] = {"127.0.1.1": "lo"}
    said = []
    assert netif.configure({}, dict(MULTI), log=said.append) == "eth0"
    assert "the only interface besides lo" in said[0]


def test_no_way_to_tell_is_one_line_naming_the_setting(machine):
    machine["hosts"]["head"] = ["127.0.1.1"]
    machine["routes"] = {"127.0.1.1": "lo"}
    machine["up"] = ["eth0", "eth1"]
    with pytest.raises(ClusterError) as e:
        netif.configure({}, dict(MULTI))
    msg = str(e.value)
    assert "\n" not in msg and "set cluster.socket_ifname=" in msg and "eth0, eth1" in msg


def test_real_route_lookup_of_loopback():
    """The one fact the fakes stand for: `ip route get 127.0.0.1` says lo (skipped without ip)."""
    if netif.shutil.which("ip") is None:
        pytest.skip("no ip (iproute2) on this machine")
    assert netif.route_dev("127.0.0.1") == "lo"
    assert netif.is_loopback("127.0.1.1") and not netif.is_loopback("10.1.2.3")
