"""``threelc emulate``: run a torchrun job on N emulated nodes joined by shaped links.

::

    threelc emulate --nodes 4 --rate 100mbit --out runs/emu -- -m threelc.launch.examples.train_digits --hook threelc

1. builds the cluster (:class:`~threelc.launch.cluster.netns.EmulatedCluster`);
2. starts one ``torchrun`` per node inside its namespace: node rank ``i``, static rendezvous on
   node 0's address, ``GLOO_SOCKET_IFNAME`` (and NCCL's/TensorPipe's) set to the node's interface,
   ``THREELC_RUN_DIR``/``THREELC_STATS_DIR`` set to ``--out`` so the examples log there;
3. reads every node's link counters before and after, and per step (logged by the training
   loop), and sets them beside the hook's accounting (:mod:`threelc.launch.cluster.wirebytes`);
4. prints the table, writes ``emulate.json``; and in every case (success, failure, ``--timeout``,
   Ctrl-C, SIGTERM) stops the processes it started and deletes every namespace it created.

Node 0's output goes to this terminal; node ``i``'s to ``OUT/node{i}.log``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .netns import EmulatedCluster, EmulationUnavailable, check_requirements, remove_stale_namespaces
from ..runs.runlog import RUN_DIR_ENV, load_run
from .wirebytes import node_traffic

__all__ = ["add_arguments", "run", "emulate", "Terminated"]

logger = logging.getLogger(__name__)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP, so ``finally`` blocks clean up."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="emulated machines (default: %(default)s)")
    parser.add_argument("--rate", default="100mbit", help="link rate per direction, tc syntax; 'none' for unshaped (default: %(default)s)")
    parser.add_argument("--delay", default=None, help="one-way delay between nodes, e.g. 20ms (a user-space delay line; needs iptables)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/emulate-TIMESTAMP)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the job is stopped (default: %(default)s)")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port on node 0 (default: %(default)s)")
    parser.add_argument("--cleanup-stale", action="store_true",
                        help="only delete namespaces left behind by emulator runs that no longer exist, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after `--`: the training script and its arguments (`-m module` for a module)")


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


def _node_command(cluster: EmulatedCluster, node: int, *, nproc_per_node: int, port: int, command: list[str]) -> list[str]:
    return [
        *cluster.exec_prefix(node), sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(cluster.nodes), "--nproc-per-node", str(nproc_per_node), "--node-rank", str(node),
        "--master-addr", cluster.address(0), "--master-port", str(port), "--max-restarts", "0",
        *command,
    ]


def _node_env(cluster: EmulatedCluster, out: Path) -> dict:
    env = dict(os.environ)
    env.update({
        # Bind every backend to the emulated link, as on a real cluster (see docs/LAUNCH.md).
        "GLOO_SOCKET_IFNAME": cluster.interface,
        "NCCL_SOCKET_IFNAME": cluster.interface,
        "TP_SOCKET_IFNAME": cluster.interface,
        RUN_DIR_ENV: str(out),
        "THREELC_STATS_DIR": str(out),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
    })
    return env


def _stop(processes: list[subprocess.Popen], cluster: EmulatedCluster) -> None:
    """Stop every node: SIGTERM to each torchrun (it stops its workers), then SIGKILL stragglers.

    torchrun starts its workers in sessions of their own, so a process-group signal does not
    reach them; whatever still runs inside one of our namespaces after the grace period is
    killed by pid (``ip netns pids``): only processes this run started live there.
    """
    alive = [proc for proc in processes if proc.poll() is None]
    for proc in alive:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in cluster.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in alive:
        proc.wait()


def _wait(processes: list[subprocess.Popen], cluster: EmulatedCluster, timeout: float) -> list[int | None]:
    """Wait for all nodes; stop the rest as soon as one fails or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc in processes]
        if all(code is not None for code in codes):
            return codes
        if any(code not in (None, 0) for code in codes):
            logger.warning("a node failed; stopping the others")
            _stop(processes, cluster)
            return [proc.returncode for proc in processes]
        if time.monotonic() > deadline:
            _stop(processes, cluster)
            raise TimeoutError(f"the job ran past --timeout {timeout:g}s and was stopped")
        time.sleep(0.2)


def emulate(command: list[str], *, nodes: int, rate: str | None, delay: str | None, nproc_per_node: int, out: Path,
            timeout: float, port: int, quiet: bool = False) -> dict:
    """Run ``command`` on the emulated cluster; return (and write) the ``emulate.json`` record.

    ``quiet``: node 0's output also goes to ``OUT/node0.log`` instead of this process's terminal
    (for benchmarks that run many jobs).
    """
    out.mkdir(parents=True, exist_ok=True)
    cluster = EmulatedCluster(nodes, rate=rate, delay=delay)
    processes: list[subprocess.Popen] = []
    logs = []
    # Ctrl-C must clean up even where SIGINT was inherited as ignored (a background job of a
    # non-interactive shell): install Python's handler explicitly.
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.time()
    try:
        cluster.create()
        env = _node_env(cluster, out)
        before = [cluster.counters(node) for node in range(nodes)]
        for node in range(nodes):
            if node == 0 and not quiet:
                stdout = stderr = None
            else:
                log = open(out / f"node{node}.log", "w", encoding="utf-8")
                logs.append(log)
                stdout, stderr = log, subprocess.STDOUT
            # Own session: the node's torchrun and its workers form one group we can stop together.
            processes.append(subprocess.Popen(
                _node_command(cluster, node, nproc_per_node=nproc_per_node, port=port, command=command),
                env=env, stdout=stdout, stderr=stderr, start_new_session=True))
        codes = _wait(processes, cluster, timeout)
        after = [cluster.counters(node) for node in range(nodes)]
    finally:
        _stop(processes, cluster)
        for log in logs:
            log.close()
        cluster.destroy()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    record = {
        "cluster": cluster.describe(),
        "nproc_per_node": nproc_per_node,
        "command": command,
        "exit_codes": codes,
        "wall_s": time.time() - started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nodes": [],
    }
    hook, links = {}, {}
    if (out / "config.json").exists():
        run = load_run(out)
        hook, links = run.hook, run.links
    for node in range(nodes):
        ranks = list(range(node * nproc_per_node, (node + 1) * nproc_per_node))
        record["nodes"].append(node_traffic(node, ranks, hook=hook, link_lines=links.get(node, []),
                                            before=before[node], after=after[node], nproc_per_node=nproc_per_node))
    with open(out / "emulate.json", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    return record


def format_table(record: dict) -> str:
    """Per node: whole-run and steady-state wire bytes beside the hook's, and the overhead."""
    header = (f"{'node':>4} {'wire tx (run)':>14} {'wire rx (run)':>14} {'iters':>7} {'wire tx/step':>13} "
              f"{'hook sent/step':>15} {'tx overhead':>11} {'rx overhead':>11}")
    lines = [header, "-" * len(header)]
    for node in record["nodes"]:
        whole = node.get("whole_run") or {}
        steady = node.get("steady")
        row = f"{node['node']:>4} {whole.get('tx_bytes', 0):>14,} {whole.get('rx_bytes', 0):>14,} "
        if steady:
            tx_over = steady["tx_overhead"]
            rx_over = steady["rx_overhead"]
            row += (f"{steady['first_iteration']:>3}-{steady['last_iteration']:<3} {steady['tx_bytes_per_step']:>13,.0f} "
                    f"{steady['hook_sent_bytes_per_step']:>15,.0f} "
                    f"{'' if tx_over is None else format(tx_over, '+.1%'):>11} "
                    f"{'' if rx_over is None else format(rx_over, '+.1%'):>11}")
        else:
            row += f"{'(no per-step counters)':>40}"
        lines.append(row)
    return "\n".join(lines)


def run(args) -> int:
    logging.basicConfig(level=os.environ.get("THREELC_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        check_requirements()
    except EmulationUnavailable as error:
        print(f"threelc emulate: {error}", file=sys.stderr)
        return 2
    if args.cleanup_stale:
        removed = remove_stale_namespaces()
        print(f"removed {len(removed)} stale namespace(s){': ' + ', '.join(removed) if removed else ''}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("threelc emulate: give the training command after `--`, e.g. "
              "`-- -m threelc.launch.examples.train_digits --hook threelc`", file=sys.stderr)
        return 2
    if "--run-dir" in command:
        print("threelc emulate: warning: --run-dir in the training command overrides --out; wire bytes per step "
              "need the training logs in --out", file=sys.stderr)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/emulate-{stamp}").resolve()
    rate = None if str(args.rate).lower() in ("none", "0", "") else args.rate
    try:
        record = emulate(command, nodes=args.nodes, rate=rate, delay=args.delay, nproc_per_node=args.nproc_per_node,
                         out=out, timeout=args.timeout, port=args.port)
    except EmulationUnavailable as error:
        print(f"threelc emulate: {error}", file=sys.stderr)
        return 2
    except TimeoutError as error:
        print(f"threelc emulate: {error}; namespaces removed", file=sys.stderr)
        return 124
    except (KeyboardInterrupt, Terminated):
        print("threelc emulate: interrupted; processes stopped and namespaces removed", file=sys.stderr)
        return 130
    print(f"\nemulated cluster: {args.nodes} nodes x {args.nproc_per_node} processes, links {rate or 'unshaped'}"
          f"{', delay ' + args.delay if args.delay else ''}")
    print(format_table(record))
    print(f"wrote {out / 'emulate.json'}")
    failed = [code for code in record["exit_codes"] if code != 0]
    if failed:
        print(f"threelc emulate: the job failed (exit codes {record['exit_codes']}); see {out}/node*.log", file=sys.stderr)
        return 1
    return 0
