"""Several emulated nodes as the benchmark's link: the box of :mod:`cluster.box`.

    with BoxLink("1gbit", nodes=2) as link:       # 2 nodes, each eth0 shaped to 1 Gbit/s
        rows, failures = harness.launch(link, nproc=2, spec={...}, workdir=...)  # 2 per node

Same interface as :class:`netem.Link` where the harness uses it (``rate``, ``label``,
``isolated``, ``fallback``, ``env``, ``qdisc``), plus ``nnodes``, ``nodes``, ``master_addr`` and
``wrap_node``: the harness starts one torchrun per node (``--node-rank I``, static rendezvous on
node 1's address). Ranks 0..P-1 are on node 1, P..2P-1 on node 2, and so on, so a ring
all-reduce crosses ``eth0`` once per node boundary; traffic inside a node stays on its ``lo``.
The worker reads both counters per node from ``/proc/net/dev`` (``/sys/class/net`` inside a box
node shows the host's interfaces). There is no fallback: without root and iproute2 the
multi-node benchmark does not run, and says why.
"""
from __future__ import annotations

import os

from cluster import box

NAME = "scbench"


class BoxLink:
    """``nodes`` emulated nodes whose ``eth0`` is shaped to ``rate`` (None/"unshaped": not shaped)."""

    def __init__(self, rate: str | None, nodes: int, name: str = NAME):
        self.bits_per_s = box.netem.parse_rate(rate)
        self.rate = "unshaped" if self.bits_per_s is None else str(rate).lower()
        self.nnodes = nodes
        self.name = name
        self.st: dict | None = None
        self.fallback = None

    def __enter__(self) -> "BoxLink":
        reason = box.why_not()
        if reason:
            raise RuntimeError(f"multi-node benchmark: {reason}")
        box.down(self.name)  # left by a killed run
        self.st = box.up(self.nnodes, link=None if self.bits_per_s is None else self.rate, name=self.name)
        return self

    def __exit__(self, *exc) -> None:
        box.down(self.name)
        self.st = None

    @property
    def isolated(self) -> bool:
        return self.st is not None

    @property
    def label(self) -> str:
        return f"{self.rate} {self.nnodes} nodes"

    @property
    def nodes(self) -> list[str]:
        return list(self.st["nodes"])

    @property
    def master_addr(self) -> str:
        return self.st["addrs"][self.st["nodes"][0]]

    def wrap_node(self, node: str, cmd: list[str]) -> list[str]:
        return box.wrap(self.st, node, cmd)

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        for k in ("MASTER_ADDR", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.pop(k, None)  # each node's hostname resolves to its eth0 address: Gloo's default is right
        return env

    def qdisc(self) -> str:
        return box.sh(["ip", "netns", "exec", box.netns(self.st, self.nodes[0]), "tc", "qdisc", "show", "dev",
                        "eth0"]).stdout.strip()
