"""Homes behind NAT, in network namespaces: the test bed of ``seedswarm bench nat``.

The picture, as on the internet::

    public bridge  10.232.X.0/24   (in the root namespace, address .254; no default route anywhere)
      |-- public host p  (.1+p)            e.g. the relay
      |-- router h       (.101+h) --MASQUERADE-- private link 10.240.(Y+h).0/24
                                                   |-- NATed host h (.2), default route via .1

* A NATed host can dial any public address: its router rewrites the source to the router's
  public address (``iptables -t nat -A POSTROUTING -o <public if> -j MASQUERADE``) and
  conntrack maps the replies back.
* ``routers="drop"`` (the default) adds ``iptables -A INPUT -i <public if> -p tcp --syn -j DROP``
  on each router: an unsolicited SYN is dropped, as most home routers do, instead of answered
  with a RST; then two NATed hosts can punch a hole (DCUtR) with simultaneous TCP dials.
* Nobody can dial a NATed host: its private subnet is known only to its own router; the public
  hosts, the other routers and the root namespace have no route to it (a dial fails at once,
  "network unreachable"), and a connection to a router's public address finds nothing
  listening there. Two NATed hosts therefore reach each other only through a relay.
* No namespace has a default route out of the test bed (the routers' only non-local subnet is
  the public one), so no packet can leave for an address this bed did not create.

Needs root, iproute2 and iptables (the nf_tables or the legacy backend); :func:`nat_unavailable`
says in one line why not. Everything is removed by :meth:`NatNet.down`.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from seedswarm.bench.netns import NetnsError, ip, netns_unavailable

#: How a router answers a connection attempt from outside that matches no mapping: ``drop`` it
#: silently (what most home routers do; TCP hole punching can work) or ``reject`` it with a
#: RST (Linux's default: the first SYN of a simultaneous open is refused, and hole punching
#: fails).
ROUTERS = ("drop", "reject")


def iptables_command() -> str | None:
    """The iptables binary that can add a MASQUERADE rule inside a namespace (None: none)."""
    for name in ("iptables", "iptables-legacy"):
        if shutil.which(name) is None:
            continue
        probe = f"sscipt{os.getpid()}"
        subprocess.run(["ip", "netns", "add", probe], capture_output=True)
        try:
            r = subprocess.run(["ip", "netns", "exec", probe, name, "-t", "nat", "-A", "POSTROUTING", "-o", "lo",
                                "-j", "MASQUERADE"], capture_output=True, text=True)
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        if r.returncode == 0:
            return name
    return None


def nat_unavailable() -> str | None:
    """Why the NAT test bed cannot be built here (None: it can)."""
    if (why := netns_unavailable()) is not None:
        return why
    if shutil.which("iptables") is None and shutil.which("iptables-legacy") is None:
        return "iptables is not installed (apt-get install iptables)"
    if iptables_command() is None:
        return "iptables cannot add a MASQUERADE rule in a namespace (no nf_tables or legacy NAT support?)"
    return None


def _free_third(prefix: str, start: int, span: int = 1) -> int:
    used = ip("-4", "addr").stdout + ip("-4", "route").stdout
    for x in [start % 200, *range(200)]:
        if all(f"{prefix}.{x + k}." not in used for k in range(span)):
            return x
    raise NetnsError(f"no free {prefix}.x.0/24 subnet")


class NatNet:
    """``public`` hosts on a bridge and ``natted`` hosts each behind its own masquerading router."""

    def __init__(self, public: int, natted: int, routers: str = "drop") -> None:
        if routers not in ROUTERS:
            raise NetnsError(f"routers must be one of {ROUTERS}, not {routers!r}")
        self.public, self.natted, self.routers = public, natted, routers
        self.tag = tag = os.getpid() % 100000
        self.pub_subnet = f"10.232.{_free_third('10.232', tag)}"
        self.priv_base = _free_third("10.240", tag, span=max(1, natted))
        self.bridge = f"snb{tag}"
        self.pub_ns = [f"snp{tag}p{i}" for i in range(public)]
        self.router_ns = [f"snp{tag}r{h}" for h in range(natted)]
        self.host_ns = [f"snp{tag}h{h}" for h in range(natted)]
        self.iptables = "iptables"
        self._made: list[str] = []
        self._bridge_made = False

    # addresses -----------------------------------------------------------------------------

    def public_ip(self, p: int) -> str:
        return f"{self.pub_subnet}.{p + 1}"

    def router_ip(self, h: int) -> str:
        """Router ``h``'s public address: what peers see as the NATed host's address."""
        return f"{self.pub_subnet}.{h + 101}"

    def private_ip(self, h: int) -> str:
        return f"10.240.{self.priv_base + h}.2"

    def router_private_ip(self, h: int) -> str:
        return f"10.240.{self.priv_base + h}.1"

    # build and tear down -------------------------------------------------------------------

    def _ns(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _veth_to_bridge(self, ns: str, dev: str, addr: str) -> None:
        outer = f"{dev}o"
        ip("link", "add", outer, "type", "veth", "peer", "name", dev)
        ip("link", "set", dev, "netns", ns)
        ip("link", "set", outer, "master", self.bridge)
        ip("link", "set", outer, "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")

    def up(self) -> None:
        ipt = next((c for c in ("iptables", "iptables-legacy") if shutil.which(c)), None)
        if ipt is None:
            raise NetnsError("iptables is not installed (apt-get install iptables)")
        self.iptables = ipt
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self._bridge_made = True
            ip("addr", "add", f"{self.pub_subnet}.254/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for p, ns in enumerate(self.pub_ns):
                self._ns(ns)
                self._veth_to_bridge(ns, f"snv{self.tag}p{p}", self.public_ip(p))
            for h in range(self.natted):
                r, host = self.router_ns[h], self.host_ns[h]
                self._ns(r)
                self._ns(host)
                pub_if = f"snv{self.tag}r{h}"
                self._veth_to_bridge(r, pub_if, self.router_ip(h))
                lan_r, lan_h = f"snl{self.tag}r{h}", f"snl{self.tag}h{h}"
                ip("-n", r, "link", "add", lan_r, "type", "veth", "peer", "name", lan_h)
                ip("-n", r, "link", "set", lan_h, "netns", host)
                ip("-n", r, "addr", "add", f"{self.router_private_ip(h)}/24", "dev", lan_r)
                ip("-n", r, "link", "set", lan_r, "up")
                ip("-n", host, "addr", "add", f"{self.private_ip(h)}/24", "dev", lan_h)
                ip("-n", host, "link", "set", lan_h, "up")
                ip("-n", host, "route", "add", "default", "via", self.router_private_ip(h))
                self._in(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
                self._in(r, ipt, "-t", "nat", "-A", "POSTROUTING", "-o", pub_if, "-j", "MASQUERADE")
                if self.routers == "drop":
                    self._in(r, ipt, "-A", "INPUT", "-i", pub_if, "-p", "tcp", "--syn", "-j", "DROP")
        except BaseException:
            self.down()
            raise

    @staticmethod
    def _in(ns: str, *cmd: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise NetnsError(f"{' '.join(cmd)} in {ns}: {r.stderr.strip()}")

    def down(self) -> None:
        for ns in reversed(self._made):
            ip("netns", "del", ns, check=False)
        self._made.clear()
        if self._bridge_made:
            ip("link", "del", self.bridge, check=False)
            self._bridge_made = False

    def reachability(self, port: int) -> dict[str, bool]:
        """Which TCP connections succeed, with a listener on ``port`` in the first public host and
        in NATed host 1 (needs two NATed hosts): the premise of the test bed, checked."""
        code = ("import socket,sys,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                "s.bind((sys.argv[1],int(sys.argv[2])));s.listen();print('up',flush=True);time.sleep(30)")
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", code, addr, str(port)],
                                  stdout=subprocess.PIPE, text=True)
                 for ns, addr in ((self.pub_ns[0], self.public_ip(0)), (self.host_ns[1], self.private_ip(1)))]
        try:
            for p in procs:
                assert p.stdout is not None
                p.stdout.readline()
            return {
                "natted_to_public": self.can_connect(self.host_ns[0], self.public_ip(0), port),
                "natted_to_natted_private": self.can_connect(self.host_ns[0], self.private_ip(1), port),
                "natted_to_natted_router": self.can_connect(self.host_ns[0], self.router_ip(1), port),
                "public_to_natted_private": self.can_connect(self.pub_ns[0], self.private_ip(1), port),
                "public_to_natted_router": self.can_connect(self.pub_ns[0], self.router_ip(1), port),
            }
        finally:
            for p in procs:
                p.kill()
                p.wait()

    def can_connect(self, from_ns: str, host: str, port: int, timeout: float = 2.0) -> bool:
        """Does a TCP connection from namespace ``from_ns`` to ``host:port`` succeed? (How the
        test bed proves that NATed hosts cannot reach each other directly.)"""
        code = ("import socket,sys\ns=socket.socket();s.settimeout(float(sys.argv[3]))\n"
                "try:\n s.connect((sys.argv[1],int(sys.argv[2])));print('ok')\nexcept OSError as e:\n print(e)")
        r = subprocess.run(["ip", "netns", "exec", from_ns, "python3", "-c", code, host, str(port), str(timeout)],
                           capture_output=True, text=True, timeout=timeout + 10)
        return r.stdout.strip() == "ok"
