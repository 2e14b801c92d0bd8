"""The emulator's delay line: its protocol pieces, and a real delayed link that it sets up and removes.

The link tests need root, iproute2 and iptables; they skip without them, except under
``THREELC_REQUIRE_EMULATION=1`` (CI), where a missing capability is a failure.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from launch_helpers import require_emulation
from threelc.launch.cluster import delayline, linkcheck, netns


@pytest.mark.parametrize("text, seconds", [("20ms", 0.02), ("1.5ms", 0.0015), ("500us", 0.0005), ("0.05s", 0.05),
                                           ("7", 0.007), (" 2MS ", 0.002)])
def test_parse_delay(text, seconds):
    assert delayline.parse_delay(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "", "-5ms", "0ms", "20 parsecs", "11s", "nan"])
def test_parse_delay_rejects(text):
    with pytest.raises(ValueError, match="delay"):
        delayline.parse_delay(text)


def test_packet_id_is_read_from_the_packet_header_attribute():
    # A queued-packet message as the kernel sends it: an unrelated attribute first, then the
    # packet header (id, hardware protocol, hook), big-endian.
    attributes = delayline._attribute(9, b"\x01\x02\x03") + delayline._attribute(1, struct.pack("!IHB", 4242, 0x800, 0))
    message = delayline._message(0, 0, attributes)
    start = delayline._NLMSG_HEADER.size + delayline._NFGEN_HEADER.size
    assert delayline._packet_id(message, start, len(message)) == 4242
    with pytest.raises(ValueError, match="packet header"):
        delayline._packet_id(message, start, start + len(delayline._attribute(9, b"\x01\x02\x03")))


def test_rule_queues_arrivals_and_bypasses_without_a_listener():
    rule = delayline.rule_arguments("eth0")
    assert rule[rule.index("-A") + 1] == "PREROUTING" and rule[rule.index("-i") + 1] == "eth0"
    assert "--queue-bypass" in rule  # no delay line listening: packets pass, never dropped


def test_delay_without_iptables_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "_tool", lambda name: None if name == "iptables" else f"/usr/sbin/{name}")
    netns.check_requirements()  # rate shaping alone needs no iptables
    with pytest.raises(netns.EmulationUnavailable, match="iptables"):
        netns.check_requirements(delay=True)


def test_bad_delay_fails_before_anything_is_built():
    with pytest.raises(ValueError, match="delay"):
        netns.EmulatedCluster(2, delay="soon")


def _namespaces_of_this_process() -> list[str]:
    return [name for name in netns.list_namespaces() if name.startswith(f"{netns.NAME_PREFIX}{os.getpid()}-")]


def test_delayed_link_round_trip_and_cleanup():
    require_emulation()
    netns.check_requirements(delay=True)
    result = linkcheck.check("100mbit", "30ms", pings=5, megabytes=2)
    # One-way 30 ms each way: no echo can come back sooner than 60 ms (load only adds to it).
    assert result["rtt_ms_min"] >= 60.0
    assert result["stream_bytes_ok"]
    assert result["packets"] > 0 and result["delay_line_cpu_s"] >= 0
    assert _namespaces_of_this_process() == []


def test_undelayed_link_is_not_held_back():
    require_emulation()
    result = linkcheck.check(None, None, pings=5, megabytes=2)
    assert result["rtt_ms_min"] < 30.0  # without a delay line nothing holds packets for 30 ms
    assert result["stream_bytes_ok"]
    assert result["delay_line_us_per_packet"] is None


def test_delay_line_process_ends_with_the_cluster():
    require_emulation()
    netns.check_requirements(delay=True)
    cluster = netns.EmulatedCluster(2, rate=None, delay="5ms")
    with cluster:
        pid = cluster.delay_line_pid
        assert pid is not None and os.path.exists(f"/proc/{pid}")
    assert cluster.delay_line_pid is None
    # The process is gone (reaped by destroy) and so are the namespaces.
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert _namespaces_of_this_process() == []


def test_linkcheck_command_prints_the_figures():
    require_emulation()
    netns.check_requirements(delay=True)
    result = subprocess.run([sys.executable, "-m", "threelc.launch.cluster.linkcheck", "--rate", "100mbit",
                             "--delay", "5ms", "--pings", "3", "--megabytes", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rtt" in result.stdout and "delay line" in result.stdout and "us per packet" in result.stdout
