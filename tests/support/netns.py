"""Test hosts in network namespaces (pyroute2): a bridge on the host side
with 169.254.77.1/24, and per host a namespace whose eth0 (a veth into the
bridge) has 169.254.77.<10+i>/24. cut() takes a host's link down; the
namespaces and the bridge are removed in teardown, even after a failure."""

from __future__ import annotations

import secrets

from pyroute2 import IPRoute, NetNS, netns

SUBNET = "169.254.77"
BRIDGE_IP = f"{SUBNET}.1"


class HostNet:
    def __init__(self, names: list[str]):
        tag = secrets.token_hex(2)
        self.bridge = f"bfbr{tag}"
        self.hosts: dict[str, dict] = {}
        self._ns: list[str] = []
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=br, address=BRIDGE_IP, prefixlen=24)
            ipr.link("set", index=br, state="up")
            for i, name in enumerate(names):
                ns = f"bf{tag}{name}"
                netns.create(ns)
                self._ns.append(ns)
                veth = f"bfv{tag}{i}"
                ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
                idx = ipr.link_lookup(ifname=veth)[0]
                ipr.link("set", index=idx, master=br)
                ipr.link("set", index=idx, state="up")
                ip = f"{SUBNET}.{10 + i}"
                with NetNS(ns) as n:
                    lo = n.link_lookup(ifname="lo")[0]
                    n.link("set", index=lo, state="up")
                    eth = n.link_lookup(ifname="eth0")[0]
                    n.addr("add", index=eth, address=ip, prefixlen=24)  # prefixlen=, not prefix= (pyroute2 0.9)
                    n.link("set", index=eth, state="up")
                self.hosts[name] = {"ns": ns, "veth": veth, "ip": ip}

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name]["ns"]]

    def ip(self, name: str) -> str:
        return self.hosts[name]["ip"]

    def cut(self, name: str, up: bool = False) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.hosts[name]["veth"])[0]
            ipr.link("set", index=idx, state="up" if up else "down")

    def destroy(self) -> None:
        with IPRoute() as ipr:
            for h in self.hosts.values():
                for idx in ipr.link_lookup(ifname=h["veth"]):
                    ipr.link("del", index=idx)
            for idx in ipr.link_lookup(ifname=self.bridge):
                ipr.link("del", index=idx)
        for ns in self._ns:
            try:
                netns.remove(ns)
            except OSError:
                pass
