"""Measure an emulated link: round-trip time and TCP throughput between two nodes, and the
delay line's cost::

    sudo python -m threelc.launch.cluster.linkcheck --rate 100mbit --delay 20ms

Builds a two-node :class:`~threelc.launch.cluster.netns.EmulatedCluster`, runs a small TCP
server on node 1 and a client on node 0 (both this module, through ``ip netns exec``): the
client times ``--pings`` one-byte echoes (``TCP_NODELAY``), then streams ``--megabytes`` MiB and
divides by the time until the server confirms receipt.  With ``--delay`` it also reads the CPU
seconds the delay-line process used and the packets it delayed (the nodes' receive counters),
so the packet rate and CPU cost per packet come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from .netns import EmulatedCluster

__all__ = ["check", "format_check"]

_PORT = 5201
_CHUNK = 1 << 20


def _serve(address: str, port: int) -> None:
    """Node 1: echo one-byte messages (``e``) or count a stream and reply with its size (``s``)."""
    listener = socket.create_server((address, port))
    print("listening", flush=True)
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = connection.recv(1)
            if mode == b"e":
                while data := connection.recv(65536):
                    connection.sendall(data)
            elif mode == b"s":
                received = 0
                while data := connection.recv(_CHUNK):
                    received += len(data)
                connection.sendall(str(received).encode())
            else:
                return


def _probe(address: str, port: int, pings: int, megabytes: int) -> dict:
    """Node 0: round-trip times of one-byte echoes, then the throughput of one stream."""
    with socket.create_connection((address, port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.sendall(b"e")
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            connection.sendall(b"x")
            connection.recv(1)
            rtts.append(time.perf_counter() - start)
    with socket.create_connection((address, port)) as connection:
        connection.sendall(b"s")
        chunk = bytes(_CHUNK)
        start = time.perf_counter()
        for _ in range(megabytes):
            connection.sendall(chunk)
        connection.shutdown(socket.SHUT_WR)
        received = int(connection.recv(64))
        seconds = time.perf_counter() - start
    with socket.create_connection((address, port)) as connection:
        connection.sendall(b"q")  # stops the server
    return {"rtt_ms": [rtt * 1e3 for rtt in rtts], "stream_bytes": received, "stream_s": seconds}


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 without one)."""
    if pid is None:
        return 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(rate: str | None, delay: str | None, *, pings: int = 20, megabytes: int = 20) -> dict:
    """Build a two-node cluster, measure its link, tear it down; returns the figures."""
    with EmulatedCluster(2, rate=rate, delay=delay) as cluster:
        server = subprocess.Popen([*cluster.exec_prefix(1), sys.executable, "-m", __spec__.name, "--serve",
                                   cluster.address(1)], stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()  # "listening"
            before = [cluster.counters(node)["rx_packets"] for node in (0, 1)]
            cpu_before, wall_before = _cpu_seconds(cluster.delay_line_pid), time.monotonic()
            client = subprocess.run([*cluster.exec_prefix(0), sys.executable, "-m", __spec__.name, "--probe",
                                     cluster.address(1), "--pings", str(pings), "--megabytes", str(megabytes)],
                                    capture_output=True, text=True, check=True, timeout=600)
            wall = time.monotonic() - wall_before
            cpu = _cpu_seconds(cluster.delay_line_pid) - cpu_before
            packets = sum(cluster.counters(node)["rx_packets"] - count for node, count in zip((0, 1), before))
        finally:
            server.kill()
            server.wait()
    figures = json.loads(client.stdout)
    rtts = figures["rtt_ms"]
    return {"rate": rate, "delay": delay, "rtt_ms_median": statistics.median(rtts), "rtt_ms_min": min(rtts),
            "rtt_ms_max": max(rtts), "stream_bytes_ok": figures["stream_bytes"] == megabytes * _CHUNK,
            "throughput_mbit_s": figures["stream_bytes"] * 8 / figures["stream_s"] / 1e6,
            "packets": packets, "seconds": wall, "delay_line_cpu_s": cpu,
            "delay_line_us_per_packet": cpu / packets * 1e6 if delay and packets else None}


def format_check(result: dict) -> str:
    line = (f"rate {result['rate'] or 'unshaped'}, delay {result['delay'] or 'none'}: "
            f"rtt {result['rtt_ms_median']:.2f} ms median ({result['rtt_ms_min']:.2f}-{result['rtt_ms_max']:.2f}), "
            f"stream {result['throughput_mbit_s']:.1f} Mbit/s")
    if result["delay"]:
        line += (f"; delay line {result['delay_line_cpu_s'] / result['seconds'] * 100:.1f}% of a core for "
                 f"{result['packets'] / result['seconds']:,.0f} packets/s "
                 f"({result['delay_line_us_per_packet']:.1f} us per packet)")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure round-trip time and throughput of an emulated link.")
    parser.add_argument("--rate", default="100mbit", help="link rate, tc syntax; 'none' for unshaped (default: %(default)s)")
    parser.add_argument("--delay", default=None, help="one-way delay, e.g. 20ms (default: none)")
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--megabytes", type=int, default=20, help="MiB streamed for the throughput")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--serve", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--probe", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, _PORT)
        return 0
    if args.probe:
        print(json.dumps(_probe(args.probe, _PORT, args.pings, args.megabytes)))
        return 0
    result = check(None if args.rate == "none" else args.rate, args.delay, pings=args.pings, megabytes=args.megabytes)
    print(json.dumps(result) if args.json else format_check(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
