"""A user-space delay line for the emulated cluster: one-way latency without ``sch_netem``.

Kernels without the netem qdisc cannot delay packets in ``tc``.  This module delays them in user
space instead, through netfilter's packet queue (``NFQUEUE``), which needs no packet copies:

* in every node's namespace one iptables rule (mangle table, ``PREROUTING``, in from ``eth0``)
  hands each arriving packet to queue 0 of that namespace, with ``--queue-bypass`` so packets
  pass undelayed if no delay line listens;
* one process (:func:`serve`) holds a netlink socket bound to queue 0 in each namespace, with
  metadata-only copies: it learns a packet's id and the time it arrived, nothing else;
* the process releases packets in arrival order once they are ``delay`` old, with one batch
  verdict ("accept every packet up to id k") per release, so its cost is per wake-up more than
  per packet.

The delay is applied where a packet arrives, after it crossed the shaped links (``tbf``): one
node-to-node trip takes ``delay`` once, a round trip twice.  Arrival is the right place: a packet
held on the sender's egress still belongs to its socket, and TCP's small-queue limit then caps
a flow at a few packets per delay (measured: 2 Mbit/s at 20 ms), while a packet that crossed
the veth pair is orphaned and holds up nothing.  The delay applies to traffic between nodes
only: processes of one node talk over loopback.

Limits (docs/LAUNCH.md has the measurements): each packet crosses into user space as a
metadata message, so the delay line costs CPU per packet; the kernel queue holds at most
``QUEUE_MAXLEN`` packets per node, beyond which packets pass undelayed (fail-open, never
dropped); wake-up jitter of the process adds to the delay (tens of microseconds when a core is
free, more when the cores are busy).

The netfilter queue protocol (``nfnetlink_queue``) is spoken here directly over an
``AF_NETLINK`` socket with :mod:`struct`, so no C library or binding is needed; the only tool is
``iptables`` (Debian package ``iptables``), to install the rule.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import select
import signal
import socket
import struct
import sys
import time

__all__ = ["QueueSocket", "parse_delay", "rule_arguments", "serve", "QUEUE_MAXLEN"]

#: Packets the kernel holds per node before it lets further ones pass undelayed.
QUEUE_MAXLEN = 65536

# linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h
_NETLINK_NETFILTER = 12
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLMSG_ERROR = 0x2
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_PACKET, _NFQNL_MSG_CONFIG, _NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
_NFQA_PACKET_HDR, _NFQA_VERDICT_HDR = 1, 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS, _NFQA_CFG_QUEUE_MAXLEN, _NFQA_CFG_MASK, _NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_COPY_META = 1
_NFQA_CFG_F_FAIL_OPEN = 0x1
_NF_ACCEPT = 1
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host order)
_NFGEN_HEADER = struct.Struct("=BBH")  # family, version, resource id (big-endian queue number)
_ATTRIBUTE_HEADER = struct.Struct("=HH")


def parse_delay(delay: str) -> float:
    """``20ms``, ``1.5ms``, ``500us``, ``0.02s`` (tc-style) in seconds; a bare number is ms."""
    text = str(delay).strip().lower()
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            number, factor = text[: -len(unit)], scale
            break
    else:
        number, factor = text, 1e-3
    try:
        seconds = float(number) * factor
    except ValueError:
        raise ValueError(f"delay {delay!r} is not a duration such as 20ms, 500us or 0.05s") from None
    if not (0.0 < seconds <= 10.0):
        raise ValueError(f"delay must be in (0, 10 s], got {delay!r}")
    return seconds


def rule_arguments(interface: str, queue: int = 0) -> list[str]:
    """iptables arguments of the rule that queues every packet arriving on ``interface``."""
    return ["-t", "mangle", "-A", "PREROUTING", "-i", interface, "-j", "NFQUEUE", "--queue-num", str(queue),
            "--queue-bypass"]


def _attribute(kind: int, payload: bytes) -> bytes:
    data = _ATTRIBUTE_HEADER.pack(_ATTRIBUTE_HEADER.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _message(kind: int, queue: int, attributes: bytes, flags: int = _NLM_F_REQUEST, sequence: int = 0) -> bytes:
    body = _NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    return _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), (_NFNL_SUBSYS_QUEUE << 8) | kind, flags, sequence, 0) + body


class QueueSocket:
    """A netlink socket bound to one netfilter queue of the namespace it was created in.

    ``receive()`` returns the ids of the packets queued since the last call; ``accept_until(k)``
    lets every packet up to id ``k`` continue.
    """

    def __init__(self, queue: int = 0):
        self.queue = queue
        self.socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            # Room for bursts: a full kernel queue's metadata messages (~100 bytes each).
            self.socket.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.socket.bind((0, 0))
        self._sequence = 0
        self._configure(_attribute(_NFQA_CFG_CMD, struct.pack("!BxH", _NFQNL_CFG_CMD_BIND, 0)))
        self._configure(_attribute(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _NFQNL_COPY_META)))
        self._configure(_attribute(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))
        self._configure(_attribute(_NFQA_CFG_FLAGS, struct.pack("!I", _NFQA_CFG_F_FAIL_OPEN))
                        + _attribute(_NFQA_CFG_MASK, struct.pack("!I", _NFQA_CFG_F_FAIL_OPEN)))
        self.socket.setblocking(False)

    def _configure(self, attributes: bytes) -> None:
        """Send one configuration message and wait for the kernel's acknowledgement."""
        self._sequence += 1
        self.socket.sendall(_message(_NFQNL_MSG_CONFIG, self.queue, attributes, _NLM_F_REQUEST | _NLM_F_ACK,
                                     self._sequence))
        reply = self.socket.recv(65536)
        _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(reply)
        if kind == _NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, _NLMSG_HEADER.size)
            if error != 0:
                raise OSError(-error, f"nfnetlink_queue configuration failed: {os.strerror(-error)}")

    def fileno(self) -> int:
        return self.socket.fileno()

    def receive(self) -> list[int]:
        """Ids of the packets the kernel queued since the last call (never blocks)."""
        ids = []
        while True:
            try:
                data = self.socket.recv(1 << 20)
            except BlockingIOError:
                return ids
            except OSError as error:  # ENOBUFS: messages were lost; the packets wait for a verdict
                if error.errno == 105:
                    continue
                raise
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
                if length < _NLMSG_HEADER.size:
                    break
                if kind == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
                    ids.append(_packet_id(data, offset + _NLMSG_HEADER.size + _NFGEN_HEADER.size, offset + length))
                offset += (length + 3) & ~3

    def accept_until(self, packet_id: int) -> None:
        """Let every queued packet with an id up to ``packet_id`` continue (one batch verdict)."""
        verdict = _attribute(_NFQA_VERDICT_HDR, struct.pack("!II", _NF_ACCEPT, packet_id))
        self.socket.send(_message(_NFQNL_MSG_VERDICT_BATCH, self.queue, verdict))

    def close(self) -> None:
        self.socket.close()


def _packet_id(data: bytes, offset: int, end: int) -> int:
    """The packet id in the attributes of one queued-packet message."""
    while offset + _ATTRIBUTE_HEADER.size <= end:
        length, kind = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        if (kind & 0x7FFF) == _NFQA_PACKET_HDR:
            return struct.unpack_from("!I", data, offset + _ATTRIBUTE_HEADER.size)[0]
        offset += max((length + 3) & ~3, _ATTRIBUTE_HEADER.size)
    raise ValueError("queued-packet message without a packet header")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _socket_in(namespace: str, queue: int) -> QueueSocket:
    """A :class:`QueueSocket` created inside the named network namespace (``ip netns``)."""
    libc = _libc()
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {namespace}")
        try:
            return QueueSocket(queue)
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(own)
        os.close(target)


def serve(sockets: list[QueueSocket], delay: float, *, ready=None, stop=None) -> None:
    """Release every queued packet ``delay`` seconds after it arrived, until ``stop()`` is true.

    ``ready`` is called once the loop runs (the caller's signal that packets will be delayed).
    """
    pending = {queue_socket: collections.deque() for queue_socket in sockets}  # (due, id), FIFO
    if ready is not None:
        ready()
    while stop is None or not stop():
        now = time.monotonic()
        next_due = None
        for queue_socket, queue in pending.items():
            last = None
            while queue and queue[0][0] <= now:
                last = queue.popleft()[1]
            if last is not None:
                queue_socket.accept_until(last)
            if queue and (next_due is None or queue[0][0] < next_due):
                next_due = queue[0][0]
        timeout = 0.5 if next_due is None else max(0.0, next_due - time.monotonic())
        readable, _, _ = select.select(sockets, [], [], timeout)
        arrived = time.monotonic()
        for queue_socket in readable:
            pending[queue_socket].extend((arrived + delay, packet_id) for packet_id in queue_socket.receive())


def main(argv: list[str] | None = None) -> int:
    """``python -m threelc.launch.cluster.delayline --delay 20ms NAMESPACE ...``: serve until SIGTERM.

    Prints ``ready`` once every namespace's queue is bound, so a parent knows packets are delayed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", required=True, help="one-way delay, e.g. 20ms")
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("namespaces", nargs="+", help="network namespaces whose queue to serve")
    args = parser.parse_args(argv)
    delay = parse_delay(args.delay)
    # Die with the emulator that started us, whatever way it ends.
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    sockets = [_socket_in(namespace, args.queue) for namespace in args.namespaces]
    try:
        serve(sockets, delay, ready=lambda: print("ready", flush=True), stop=lambda: bool(stopping))
    finally:
        for queue_socket in sockets:
            queue_socket.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
