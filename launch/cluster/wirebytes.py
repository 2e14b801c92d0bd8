"""Wire bytes from link counters, set beside the hook's own accounting, per node.

Two windows:

* ``whole_run``: counters before the first process started and after the last one ended
  (rendezvous, process-group setup, model broadcast and all steps included);
* ``steady``: from the end of the last warm-up step to the end of the last step, using the
  per-step counters the training loop logs (``link-node{I}.jsonl``).  Bytes per step are the
  *median* of the per-step counter deltas, not total / steps: a sender's last bytes of a
  collective can still sit in its socket buffer when it samples its counters (it needs nothing
  more from its peers), so they are counted in the next step; after the warm-up's megabytes of
  allreduce that tail (measured up to 0.8 MB) lands in the first steady step and, averaged,
  would be charged to the compressing hook.  The hook's bytes are summed
  over the same steps for the ranks of that node, so ``overhead = wire / hook - 1`` is what the
  protocols add on top of the payload: Ethernet/IP/TCP headers (66 bytes per frame of at most
  1448 payload bytes, ~4.6%), TCP ACKs for the opposite direction, gloo's message headers,
  and any retransmissions.
"""

from __future__ import annotations

import logging
import statistics

from ..runs.summary import steady_window

__all__ = ["node_traffic", "median_step_delta"]

logger = logging.getLogger(__name__)


def median_step_delta(link_lines: list[dict], first: int, last: int, key: str) -> float | None:
    """Median over iterations first..last of counter ``key``'s growth during that iteration.

    Link sample k is taken after k completed steps, so iteration i runs between samples i and i + 1.
    """
    by_step = {line["step"]: line for line in link_lines}
    deltas = [by_step[i + 1][key] - by_step[i][key] for i in range(first, last + 1) if i in by_step and i + 1 in by_step]
    return statistics.median(deltas) if deltas else None


def _sum(lines, key, first, last):
    return sum(line[key] for line in lines if first <= line["step"] <= last)


def node_traffic(node: int, ranks: list[int], *, hook: dict[int, list[dict]], link_lines: list[dict],
                 before: dict | None, after: dict | None, nproc_per_node: int) -> dict:
    """One node's wire bytes (both windows) beside its ranks' hook bytes."""
    record = {"node": node, "ranks": ranks}
    if before and after:
        record["whole_run"] = {key: after[key] - before[key] for key in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")}
    first_rank_lines = hook.get(ranks[0], []) if ranks else []
    window = steady_window(first_rank_lines)
    # Link sample k is taken after k completed steps; hook iteration i runs between samples i and i + 1.
    by_step = {line["step"]: line for line in link_lines}
    if window is None or window[0] not in by_step or (window[1] + 1) not in by_step:
        record["steady"] = None
        return record
    first, last = window
    start, end = by_step[first], by_step[last + 1]
    steps = last - first + 1
    wire = {key: end[key] - start[key] for key in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")}
    hook_sent = sum(_sum(hook.get(rank, []), "sent_bytes", first, last) for rank in ranks)
    hook_received = sum(_sum(hook.get(rank, []), "received_bytes", first, last) for rank in ranks)
    tx_per_step = median_step_delta(link_lines, first, last, "tx_bytes")
    rx_per_step = median_step_delta(link_lines, first, last, "rx_bytes")
    record["steady"] = {
        "first_iteration": first,
        "last_iteration": last,
        "steps": steps,
        **wire,
        "tx_bytes_per_step": tx_per_step,
        "rx_bytes_per_step": rx_per_step,
        "tx_bytes_mean_per_step": wire["tx_bytes"] / steps,
        "hook_sent_bytes": hook_sent,
        "hook_received_bytes": hook_received,
        "hook_sent_bytes_per_step": hook_sent / steps,
        "tx_overhead": (tx_per_step * steps / hook_sent - 1) if hook_sent else None,
        "rx_overhead": (rx_per_step * steps / hook_received - 1) if hook_received else None,
        # With several processes per node the hook also counts traffic between them, which
        # stays on loopback: then the hook's figure is an upper bound of what leaves the node.
        "hook_includes_intra_node": nproc_per_node > 1,
    }
    return record
