"""The emulated cluster: real wire bytes on shaped veth links, and cleanup in every case.

These tests need root and iproute2.  They skip without them, except where the environment sets
``THREELC_REQUIRE_EMULATION=1`` (CI does): there a missing capability is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch_helpers import require_emulation
from threelc.launch.cluster import netns
from threelc.launch.cluster.wirebytes import node_traffic
from threelc.launch.runs.summary import steady_window


def _emulate(tmp_path, name, script_args, *, nodes=2, rate="100mbit", timeout=180, extra=()):
    out = tmp_path / name
    command = [sys.executable, "-m", "threelc.cli", "emulate", "--nodes", str(nodes), "--rate", rate,
               "--out", str(out), "--port", str(29600 + os.getpid() % 300), *extra, "--", *script_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=timeout)
    assert _ours(process.pid) == []
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), out


def _ours(pid: int) -> list[str]:
    return [name for name in netns.list_namespaces() if name.startswith(f"{netns.NAME_PREFIX}{pid}-")]


def test_parse_rate():
    assert netns.parse_rate("100mbit") == 100e6
    assert netns.parse_rate("1gbit") == 1e9
    assert netns.parse_rate("12mbps") == 96e6
    with pytest.raises(ValueError, match="tc rate"):
        netns.parse_rate("fast")


def test_not_root_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.EmulationUnavailable, match="needs root"):
        netns.check_requirements()


def test_no_iproute2_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "_tool", lambda name: None)
    with pytest.raises(netns.EmulationUnavailable, match="iproute2"):
        netns.check_requirements()


def test_steady_window_and_overhead_arithmetic():
    hook = {0: [{"step": i, "sent_bytes": 100, "received_bytes": 200, "compressed": i >= 2} for i in range(5)]}
    # The first compressed step (2) carries one-time work (the exchange plan's probe): not steady.
    assert steady_window(hook[0]) == (3, 4)
    assert steady_window([{"step": i, "compressed": False} for i in range(3)]) == (1, 2)
    assert steady_window([{"step": i, "compressed": i == 2} for i in range(3)]) == (2, 2)
    # threelc's planning steps (its probe, a measured trial of both collectives) are not steady either.
    assert steady_window([{"step": i, "compressed": i >= 2, "planning": 2 <= i <= 5} for i in range(9)]) == (6, 8)
    links = [{"step": k, "tx_bytes": 1000 + 110 * k, "rx_bytes": 50 + 220 * k, "tx_packets": k, "rx_packets": k}
             for k in range(6)]
    record = node_traffic(0, [0], hook=hook, link_lines=links, before=links[0], after=links[-1], nproc_per_node=1)
    steady = record["steady"]
    assert (steady["first_iteration"], steady["last_iteration"], steady["steps"]) == (3, 4, 2)
    assert steady["tx_bytes"] == 220 and steady["hook_sent_bytes"] == 200
    assert steady["tx_overhead"] == pytest.approx(0.1) and steady["rx_overhead"] == pytest.approx(0.1)
    assert record["whole_run"]["tx_bytes"] == 550


def test_cluster_links_are_shaped_and_removed():
    require_emulation()
    with netns.EmulatedCluster(2, rate="50mbit") as cluster:
        assert set(_ours(os.getpid())) == {cluster.switch, cluster.node_namespace(0), cluster.node_namespace(1)}
        qdiscs = subprocess.run(["tc", "-n", cluster.node_namespace(0), "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdiscs and "50Mbit" in qdiscs
        # 2 MB from node 0 to node 1 over a 50 Mbit/s link: at least 0.25 s, and the counters see it.
        # The receiver times the transfer from its first byte to the sender's close: that is
        # what the link's rate bounds (a sender's sendall returns once its socket buffer has it).
        server = ("import socket, time; s = socket.create_server(('10.77.0.2', 5001)); c, _ = s.accept()\n"
                  "n = len(c.recv(1 << 16)); t = time.monotonic()\n"
                  "while (d := c.recv(1 << 16)): n += len(d)\nprint(n, time.monotonic() - t)")
        # The client retries until the receiver listens (its start-up is slow on a loaded machine).
        client = ("import socket, time\nfor _ in range(300):\n    try:\n"
                  "        s = socket.create_connection(('10.77.0.2', 5001)); break\n"
                  "    except ConnectionRefusedError:\n        time.sleep(0.1)\n"
                  "s.sendall(b'x' * 2_000_000); s.close()")
        receiver = subprocess.Popen(cluster.exec_prefix(1) + [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
        before = cluster.counters(0)
        subprocess.run(cluster.exec_prefix(0) + [sys.executable, "-c", client], check=True, timeout=60)
        received, seconds = receiver.communicate(timeout=30)[0].split()
        sent = cluster.counters(0)["tx_bytes"] - before["tx_bytes"]
        assert received == "2000000"
        assert float(seconds) > 0.25  # 16 Mbit at 50 Mbit/s: 0.32 s (less the bucket's first burst)
        assert 2_000_000 * 1.03 < sent < 2_000_000 * 1.08  # ~4.6% Ethernet/IP/TCP headers per 1448-byte frame
    assert _ours(os.getpid()) == []


@pytest.mark.slow
def test_failing_job_leaves_no_namespaces(tmp_path):
    require_emulation()
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(3)\n")
    process = subprocess.Popen([sys.executable, "-m", "threelc.cli", "emulate", "--nodes", "2", "--out",
                                str(tmp_path / "out"), "--", str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "failed" in stderr
    assert _ours(process.pid) == []


def _running(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (a unique temporary path)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigint", "timeout"])
def test_interrupted_job_leaves_no_namespaces_or_processes(tmp_path, how):
    require_emulation()
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(120)\n")
    extra = ["--timeout", "8"] if how == "timeout" else []
    # SIGINT may be inherited as ignored (pytest run from a background job); Ctrl-C must still work.
    process = subprocess.Popen([sys.executable, "-m", "threelc.cli", "emulate", "--nodes", "2", *extra, "--out",
                                str(tmp_path / "out"), "--", str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if how == "sigint":
        deadline = time.monotonic() + 60
        while len(_running(str(script))) < 2 and time.monotonic() < deadline:  # both nodes' workers run
            time.sleep(0.2)
        assert len(_ours(process.pid)) == 3
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == (130 if how == "sigint" else 124)
    assert ("interrupted" if how == "sigint" else "--timeout") in stderr
    assert _ours(process.pid) == []
    assert _running(str(script)) == []


@pytest.mark.slow
def test_wire_bytes_threelc_far_below_allreduce_and_above_hook_accounting(tmp_path):
    require_emulation()
    # (24 steps: 3 of warm-up, the hook's probe and a possible trial of its header modes, 13, then steady ones)
    common = ["-m", "threelc.launch.examples.train_digits", "--width", "16", "--steps", "24", "--warmup-steps", "3",
              "--eval-every", "24", "--no-progress"]
    steady = {}
    for hook in ("allreduce", "threelc"):
        result, out = _emulate(tmp_path, hook, [*common, "--hook", hook])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        record = json.loads((out / "emulate.json").read_text())
        assert record["exit_codes"] == [0, 0]
        steady[hook] = [node["steady"] for node in record["nodes"]]
        for node in steady[hook]:
            # The wire carries at least what the hook says it sent, plus headers (and not 2x more).
            assert node["hook_sent_bytes"] <= node["tx_bytes"] < 2 * node["hook_sent_bytes"] + 20_000
            assert node["hook_received_bytes"] <= node["rx_bytes"]
    # Steady state: threelc (3LC-compressed from iteration 3, steady from 4: iteration 3 carries the
    # exchange plan's one-time probe; from 16 if the plan's call between header modes was close and
    # it measured both for 12 steps) against fp32 allreduce (from iteration 1).
    firsts = {node["first_iteration"] for node in steady["threelc"]}
    assert firsts in ({4}, {16}), firsts
    for fp32, compressed in zip(steady["allreduce"], steady["threelc"]):
        assert compressed["tx_bytes_per_step"] * 10 < fp32["tx_bytes_per_step"]
        assert abs(fp32["tx_overhead"]) < 0.15  # headers (~4.6%) + ACKs; big messages
