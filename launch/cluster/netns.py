"""An emulated cluster on one machine: network namespaces, a bridge, veth links shaped by tc.

Layout for ``nodes = 3`` (names carry a per-run prefix ``threelc-{pid}-{token}`` so parallel runs
never collide, and a leftover can be traced to its dead owner)::

    {prefix}-n0: eth0 10.77.0.1 --veth-- p0 \\
    {prefix}-n1: eth0 10.77.0.2 --veth-- p1 -- br0 in {prefix}-sw (the switch)
    {prefix}-n2: eth0 10.77.0.3 --veth-- p2 /

Every device is created directly inside a namespace, never in the host's: deleting the
namespaces removes everything.  Each link is shaped in both directions with a token bucket
(``tbf``): on the node's ``eth0`` (what the node sends) and on the switch port ``pI`` (what the node
receives).  ``delay`` starts a user-space delay line (:mod:`.delayline`: netfilter's packet
queue, no ``sch_netem`` needed): every packet a node receives from another node is held for
``delay``, so a one-way trip takes ``delay`` and a round trip ``2 * delay``.
Traffic between processes of the same node stays on its loopback device, as on a real machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys

from . import delayline
from .delayline import parse_delay

__all__ = [
    "EmulatedCluster",
    "EmulationUnavailable",
    "check_requirements",
    "parse_rate",
    "remove_stale_namespaces",
    "list_namespaces",
    "NAME_PREFIX",
]

logger = logging.getLogger(__name__)

#: Every namespace this module creates starts with this.
NAME_PREFIX = "threelc-"
_NAME_PATTERN = re.compile(r"^threelc-(\d+)-[0-9a-f]+-(sw|n\d+)$")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


class EmulationUnavailable(RuntimeError):
    """This machine cannot build the emulated cluster (not root, no iproute2, no qdisc...)."""


def parse_rate(rate: str) -> float:
    """tc-style rate (``100mbit``, ``1gbit``, ``500kbit``, ``12mbps``) in bits per second."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(rate))
    unit = match.group(2).lower() if match else None
    if not match or (unit and unit not in _RATE_UNITS):
        raise ValueError(f"rate {rate!r} is not a tc rate such as 100mbit, 1gbit or 500kbit")
    bits = float(match.group(1)) * _RATE_UNITS[unit or "bit"]
    if bits <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    return bits


def _tool(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def check_requirements(delay: bool = False) -> dict:
    """Paths of ``ip`` and ``tc`` (and ``iptables`` for a ``delay``); raise
    :class:`EmulationUnavailable` saying what is missing."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        raise EmulationUnavailable("the emulated cluster needs Linux network namespaces")
    if os.geteuid() != 0:
        raise EmulationUnavailable(
            "threelc emulate needs root to create network namespaces (run it with sudo, or as root in a container "
            "with CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    tools = {name: _tool(name) for name in ("ip", "tc")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise EmulationUnavailable(f"threelc emulate needs iproute2 ({' and '.join(missing)} not found); "
                                   "install it, e.g. `apt-get install iproute2`")
    if delay:
        tools["iptables"] = _tool("iptables")
        if tools["iptables"] is None:
            raise EmulationUnavailable("threelc emulate --delay needs iptables (its delay line queues packets with an "
                                       "iptables NFQUEUE rule); install it, e.g. `apt-get install iptables`")
    return tools


def list_namespaces(ip: str = "ip") -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    result = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces(ip: str = "ip") -> list[str]:
    """Delete namespaces left by emulator runs whose process no longer exists; return their names."""
    removed = []
    for name in list_namespaces(ip):
        match = _NAME_PATTERN.match(name)
        if match and not _pid_alive(int(match.group(1))):
            subprocess.run([ip, "netns", "delete", name], capture_output=True, check=False)
            removed.append(name)
    return removed


class EmulatedCluster:
    """``nodes`` namespaces on a shaped bridge.  ``create()`` it, and always ``destroy()`` it.

    Use as a context manager, or call ``create()`` inside ``try`` and ``destroy()`` in
    ``finally``; ``destroy()`` removes whatever ``create()`` got to, even if it failed half-way.

    Parameters
    ----------
    nodes : int
        Number of emulated machines (>= 1).
    rate : str
        Link rate per direction, tc syntax (``100mbit``); ``None`` leaves links unshaped.
    delay : str, optional
        One-way delay between any two nodes (``20ms``, ``500us``), applied by a user-space
        delay line (:mod:`.delayline`); needs ``iptables`` and the kernel's NFQUEUE target.
    subnet : str
        First three octets of the nodes' /24 (inside the namespaces only).
    """

    interface = "eth0"

    def __init__(self, nodes: int, *, rate: str | None = "100mbit", delay: str | None = None, subnet: str = "10.77.0"):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        if nodes > 250:
            raise ValueError("at most 250 nodes fit the /24 subnet")
        self.nodes = nodes
        self.rate = rate
        self.rate_bits = parse_rate(rate) if rate else None
        self.delay = delay
        self.delay_s = parse_delay(delay) if delay else None
        self.subnet = subnet
        self.tools = check_requirements(delay=bool(delay))
        self.prefix = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self.namespaces: list[str] = []  # created so far, in order: what destroy() removes
        self._delay_line: subprocess.Popen | None = None

    # ------------------------------------------------------------------ naming
    def node_namespace(self, node: int) -> str:
        return f"{self.prefix}-n{node}"

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    def exec_prefix(self, node: int) -> list[str]:
        """Prepend to a command to run it inside node ``node``."""
        return [self.tools["ip"], "netns", "exec", self.node_namespace(node)]

    # ------------------------------------------------------------------ building
    def _run(self, *args: str) -> None:
        result = subprocess.run(list(args), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise EmulationUnavailable(f"`{' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")

    def _ip(self, *args: str) -> None:
        self._run(self.tools["ip"], *args)

    def _add_namespace(self, name: str) -> None:
        self._ip("netns", "add", name)
        self.namespaces.append(name)

    def _one_frame_per_packet(self, namespace: str, device: str) -> None:
        """Make ``device`` carry MTU-sized frames, as a real NIC puts them on the wire.

        veth passes TCP's 64 KiB segmentation-offload packets whole, so its counters would show
        one set of headers per 64 KiB instead of one per 1500-byte frame (and tbf would meter
        bursts of 64 KiB). Capping GSO at one segment makes headers and pacing frame-accurate.
        """
        self._ip("-n", namespace, "link", "set", "dev", device, "gso_max_segs", "1")

    def _shape(self, namespace: str, device: str) -> None:
        """Token bucket at ``rate`` on ``device``'s egress."""
        if self.rate_bits is not None:
            self._token_bucket(namespace, device)

    def _qdisc_add(self, namespace: str, device: str) -> list[str]:
        return [self.tools["tc"], "-n", namespace, "qdisc", "add", "dev", device]

    def _token_bucket(self, namespace: str, device: str) -> None:
        """tbf at ``rate`` on ``device``'s egress (the root qdisc)."""
        rate_bytes = self.rate_bits / 8
        # Bucket: 4 ms of traffic (above one timer tick at HZ=250), at least 16 KiB so a few
        # full-size frames pass at low rates.  Queue: 100 ms of traffic, at least 256 KiB,
        # so bursts of gradient traffic queue instead of being dropped and resent.
        burst = max(16 * 1024, int(rate_bytes * 0.004))
        limit = max(256 * 1024, int(rate_bytes * 0.1))
        self._run(*self._qdisc_add(namespace, device), "root", "handle", "1:", "tbf",
                  "rate", f"{int(self.rate_bits)}bit", "burst", str(burst), "limit", str(limit))

    def _start_delay_line(self) -> None:
        """Queue what each node receives from the others, and start the process that delays it."""
        nodes = [self.node_namespace(node) for node in range(self.nodes)]
        for namespace in nodes:
            self._ip("netns", "exec", namespace, self.tools["iptables"], *delayline.rule_arguments(self.interface))
        self._delay_line = subprocess.Popen([sys.executable, "-m", delayline.__name__, "--delay", self.delay, *nodes],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self._delay_line.stdout.readline().strip() != "ready":
            error = self._delay_line.communicate(timeout=10)[1]
            raise EmulationUnavailable(f"the delay line for --delay {self.delay} did not start: {error.strip()}")

    def _stop_delay_line(self) -> None:
        if self._delay_line is None:
            return
        self._delay_line.terminate()
        try:
            self._delay_line.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._delay_line.kill()
            self._delay_line.communicate()
        self._delay_line = None

    @property
    def delay_line_pid(self) -> int | None:
        """The delay line's process id while it runs (``None`` without ``delay``)."""
        return None if self._delay_line is None else self._delay_line.pid

    def create(self) -> "EmulatedCluster":
        """Build the switch, the nodes and the shaped links."""
        logger.info("creating %d emulated nodes (%s, rate %s, delay %s)", self.nodes, self.prefix, self.rate, self.delay)
        self._add_switch()
        for node in range(self.nodes):
            self._add_node(node)
        if self.delay:
            self._start_delay_line()
        return self

    def _add_switch(self) -> None:
        """The switch: a namespace holding the bridge ``br0`` every node's link is plugged into."""
        self._add_namespace(self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")

    def _add_node(self, node: int) -> None:
        """Node ``node``: its namespace, a veth link from its ``eth0`` to switch port ``p{node}``, shaped both ways."""
        namespace, port = self.node_namespace(node), f"p{node}"
        self._add_namespace(namespace)
        self._ip("link", "add", self.interface, "netns", namespace, "type", "veth", "peer", "name", port,
                 "netns", self.switch)
        self._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        for end_namespace, device in ((namespace, self.interface), (self.switch, port)):
            self._one_frame_per_packet(end_namespace, device)
        self._ip("-n", namespace, "addr", "add", f"{self.address(node)}/24", "dev", self.interface)
        self._ip("-n", namespace, "link", "set", self.interface, "up")
        # Processes of one node reach each other (and the rendezvous on node 0) over loopback.
        self._ip("-n", namespace, "link", "set", "lo", "up")
        self._shape(namespace, self.interface)  # what the node sends
        self._shape(self.switch, port)  # what the node receives

    def destroy(self) -> None:
        """Delete every namespace this object created (devices go with them). Never raises."""
        # A second Ctrl-C must not cut the cleanup short.
        previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: cannot touch signals, clean up anyway
            previous = None
        try:
            self._stop_delay_line()
            for name in reversed(self.namespaces):
                result = subprocess.run([self.tools["ip"], "netns", "delete", name], capture_output=True, text=True,
                                        check=False)
                if result.returncode != 0:
                    logger.warning("could not delete namespace %s: %s", name, result.stderr.strip())
            self.namespaces.clear()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> "EmulatedCluster":
        try:
            return self.create()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    # ------------------------------------------------------------------ measuring
    def counters(self, node: int) -> dict:
        """Bytes and packets node ``node``'s ``eth0`` has sent and received so far."""
        result = subprocess.run([self.tools["ip"], "-n", self.node_namespace(node), "-s", "-j", "link", "show", "dev",
                                 self.interface], capture_output=True, text=True, check=True)
        stats = json.loads(result.stdout)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}

    def pids(self) -> list[int]:
        """Processes running inside this cluster's namespaces now."""
        found = []
        for name in list(self.namespaces):
            result = subprocess.run([self.tools["ip"], "netns", "pids", name], capture_output=True, text=True, check=False)
            found += [int(token) for token in result.stdout.split() if token.isdigit()]
        return found

    def describe(self) -> dict:
        described = {"nodes": self.nodes, "rate": self.rate, "rate_bits_per_s": self.rate_bits, "delay": self.delay,
                     "prefix": self.prefix, "addresses": [self.address(node) for node in range(self.nodes)],
                     "interface": self.interface, "shaping": "tbf on both ends of each veth link"}
        if self.delay:
            described["delay_line"] = "user space (NFQUEUE): each packet held on arrival at its node"
        return described
