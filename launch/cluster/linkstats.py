"""Byte counters of a network interface, as the kernel counts them (link layer, headers included).

Read from ``/sys/class/net/IFACE/statistics`` of the caller's network namespace: a process started
with ``ip netns exec`` sees its namespace's interfaces there.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_counters", "interface_exists"]

_SYS_NET = Path("/sys/class/net")


def interface_exists(interface: str) -> bool:
    """Whether this namespace has ``interface`` with readable counters."""
    return bool(interface) and (_SYS_NET / interface / "statistics" / "tx_bytes").exists()


def read_counters(interface: str) -> dict:
    """``{"tx_bytes", "rx_bytes", "tx_packets", "rx_packets"}`` of ``interface`` now."""
    statistics = _SYS_NET / interface / "statistics"
    return {name: int((statistics / name).read_text()) for name in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")}
