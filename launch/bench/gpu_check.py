"""The prepared GPU check of the device codec: throughput against device copy, byte identity, NCCL.

Run on a machine with one CUDA GPU (a few minutes)::

    python3 -m threelc.launch.bench.gpu_check --out gpu_check.json

It measures, on a 64M-value float32 CUDA tensor split into segments like a DDP bucket:

1. device-to-device copy bandwidth (``dst.copy_(src)``), timed with CUDA events;
2. encode (:func:`~threelc.hooks.device_codec.compress_tensor` with a residual) and decode
   (:func:`~threelc.hooks.device_codec.decompress_tensor`, with and without the body check)
   throughput, in float32 input bytes per second, and their ratio to copy (target >= 0.25);
3. byte identity of device payloads, residuals and decoded values against the numba CPU codec
   on samples (gradient-like, zero-heavy, block mode, small chunks, non-finite);
4. if NCCL accepts two ranks on one GPU, a 2-process exchange of device payloads (sizes, then
   padded all_gather, decode and average on the device), checked against the CPU codec;
   otherwise the error is recorded and the codec figures stand alone.  (The same exchange runs
   with gloo on CPU in the tests: ``run_exchange(numel, "cpu")``.)

It prints a table and writes every figure to ``--out`` as JSON.  Without a CUDA device it exits
with status 2 and says so; ``--device cpu --numel 20000`` runs the same steps on CPU as a smoke
test of the script itself (the test suite does that).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

import threelc
from threelc.hooks.device_codec import compress_tensor, decompress_tensor

__all__ = ["main"]

TARGET_RATIO = 0.25


class _Skipped(Exception):
    """The fused variant was not asked for."""


def _timer(device: torch.device, function, repeats: int) -> float:
    """Median seconds per call of ``function`` after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            began = time.perf_counter()
            function()
            times.append(time.perf_counter() - began)
    return float(np.median(times))


def _segments(numel: int, count: int, seed: int) -> list[int]:
    """Segment sizes of a bucket of ``count`` parameters of uneven sizes."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, count) + 0.01
    sizes = np.floor(weights / weights.sum() * numel).astype(np.int64)
    sizes[0] += numel - sizes.sum()
    return sizes.tolist()


def _gradient_like(numel: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(numel, generator=generator) * 1e-3
    values[torch.rand(numel, generator=generator) < 0.01] *= 30.0  # a heavy tail
    return values.to(device)


def _identity_cases(device: torch.device, numel: int):
    """(name, x on host as numpy, compress keyword arguments) of the identity samples."""
    sample = min(numel, 1 << 21)
    x = _gradient_like(sample, torch.device("cpu"), 1).numpy()
    zero_heavy = x.copy()
    zero_heavy[: sample // 2] = 0.0
    small = min(sample, 100003)
    nonfinite = x[:1000].copy()
    nonfinite[nonfinite.size // 2] = np.inf
    return [
        ("gradient_segments", x, dict(sparsity=1.5, segments=_segments(sample, 37, 2))),
        ("zero_heavy", zero_heavy, dict(sparsity=1.0)),
        ("blocks", x, dict(sparsity=1.9, segments=_segments(sample, 5, 3), block=4096)),
        ("small_chunks", x[:small], dict(sparsity=1.2, chunk=55, segments=[3, 0, small - 3])),
        ("nonfinite", nonfinite, dict()),
    ]


def check_identity(device: torch.device, numel: int, fuse: bool = False) -> list[dict]:
    """Device payloads, residuals and decodes against the numba codec, bit for bit."""
    results = []
    for name, x, kwargs in _identity_cases(device, numel):
        kwargs = dict(kwargs, fuse=True) if fuse else kwargs
        residual_host = (np.random.default_rng(4).standard_normal(x.size) * 1e-4).astype(np.float32)
        residual_device = torch.from_numpy(residual_host.copy()).to(device)
        numba_kwargs = {key: value for key, value in kwargs.items() if key != "fuse"}
        case = {"case": name + (" (fused)" if fuse else ""), "values": int(x.size)}
        try:
            expected = threelc.compress(x, residual=residual_host, nonfinite="flag", **numba_kwargs)
            payload = compress_tensor(torch.from_numpy(x).to(device), residual=residual_device, **kwargs)
            decoded = decompress_tensor(payload).cpu().numpy()
            case.update(
                payload_identical=payload.cpu().numpy().tobytes() == expected.tobytes(),
                residual_identical=residual_device.cpu().numpy().tobytes() == residual_host.tobytes(),
                decode_identical=decoded.tobytes() == threelc.decompress(expected).tobytes(),
            )
        except Exception as error:  # recorded as a failed case
            case["error"] = f"{type(error).__name__}: {error}"
        results.append(case)
    return results


def measure_throughput(device: torch.device, numel: int, repeats: int, sparsity: float, fuse: bool = True) -> dict:
    """Copy, encode and decode times on one large bucket."""
    x = _gradient_like(numel, device, 0)
    residual = torch.zeros_like(x)
    segments = _segments(numel, 161, 0)
    destination = torch.empty_like(x)
    copy_s = _timer(device, lambda: destination.copy_(x), repeats)
    encode_s = _timer(device, lambda: compress_tensor(x, sparsity=sparsity, residual=residual, segments=segments),
                      repeats)
    encode_fused_s, fused_error = float("nan"), "skipped (--no-fuse)"
    try:
        if not fuse:
            raise _Skipped
        compress_tensor(x, sparsity=sparsity, residual=residual, segments=segments, fuse=True)  # compiles
        encode_fused_s = _timer(device, lambda: compress_tensor(x, sparsity=sparsity, residual=residual,
                                                                segments=segments, fuse=True), repeats)
        fused_error = None
    except _Skipped:
        pass
    except Exception as error:  # torch.compile may be unavailable (no Triton, no compiler)
        encode_fused_s, fused_error = float("nan"), f"{type(error).__name__}: {error}"
    payload = compress_tensor(x, sparsity=sparsity, residual=residual, segments=segments)
    decode_s = _timer(device, lambda: decompress_tensor(payload, destination), repeats)
    decode_unchecked_s = _timer(device, lambda: decompress_tensor(payload, destination, validate=False), repeats)
    accumulate_s = _timer(device, lambda: decompress_tensor(payload, destination, accumulate=True), repeats)
    # The numba CPU codec on the same values, for scale: the host path the device codec replaces.
    x_host, residual_host = x.cpu().numpy(), np.zeros(numel, np.float32)
    cpu = torch.device("cpu")
    numba_encode_s = _timer(cpu, lambda: threelc.compress(x_host, sparsity=sparsity, residual=residual_host,
                                                          segments=segments), repeats)
    payload_host = threelc.compress(x_host, sparsity=sparsity, segments=segments)
    out_host = np.empty(numel, np.float32)
    numba_decode_s = _timer(cpu, lambda: threelc.decompress(payload_host, out_host), repeats)
    data_bytes = 4 * numel

    def gbps(seconds):
        return data_bytes / seconds / 1e9

    return {
        "segments": len(segments),
        "payload_bytes": int(payload.numel()),
        "compression_ratio": data_bytes / payload.numel(),
        "copy_ms": copy_s * 1e3,
        "encode_ms": encode_s * 1e3,
        "encode_fused_ms": encode_fused_s * 1e3,
        "encode_fused_error": fused_error,
        "decode_ms": decode_s * 1e3,
        "decode_unchecked_ms": decode_unchecked_s * 1e3,
        "decode_accumulate_ms": accumulate_s * 1e3,
        "numba_encode_ms": numba_encode_s * 1e3,
        "numba_decode_ms": numba_decode_s * 1e3,
        "copy_gbps": gbps(copy_s),
        "encode_gbps": gbps(encode_s),
        "encode_fused_gbps": gbps(encode_fused_s),
        "decode_gbps": gbps(decode_s),
        "decode_unchecked_gbps": gbps(decode_unchecked_s),
        "numba_encode_gbps": gbps(numba_encode_s),
        "numba_decode_gbps": gbps(numba_decode_s),
        "encode_ratio": copy_s / encode_s,
        "encode_fused_ratio": copy_s / encode_fused_s,
        "decode_ratio": copy_s / decode_s,
    }


def _exchange_worker(rank: int, world: int, init_file: str, numel: int, device_type: str, queue) -> None:
    """One rank of the exchange: compress, gather sizes and payloads, decode and average.

    NCCL on GPU 0 for the check; gloo on CPU runs the same steps as a smoke test of this code.
    """
    try:
        import torch.distributed as dist

        if device_type == "cuda":
            torch.cuda.set_device(0)
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
        device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
        synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
        x = _gradient_like(numel, device, 100 + rank)
        residual = torch.zeros_like(x)
        segments = _segments(numel, 16, 5)
        timings = []
        for _ in range(4):
            synchronize()
            began = time.perf_counter()
            payload = compress_tensor(x, sparsity=1.5, residual=residual, segments=segments)
            # Uneven payloads: exchange sizes, pad to the largest, gather, trim each one.
            size = torch.tensor([payload.numel()], device=device)
            sizes = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(sizes, size)
            sizes = [int(s) for s in torch.cat(sizes).tolist()]  # the size exchange's host sync
            padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
            padded[: payload.numel()] = payload
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded)
            total = torch.zeros_like(x)
            for peer, peer_size in enumerate(sizes):
                decompress_tensor(gathered[peer][:peer_size], total, accumulate=True)
            total /= world
            synchronize()
            timings.append(time.perf_counter() - began)
        payloads = [gathered[peer][:sizes[peer]].cpu().numpy() for peer in range(world)]
        queue.put({"rank": rank, "ok": True, "step_ms": float(np.median(timings[1:]) * 1e3),
                   "payload_bytes": sizes, "average": total.cpu().numpy(), "payloads": payloads})
        dist.destroy_process_group()
    except Exception as error:  # reported to the parent, which records it
        queue.put({"rank": rank, "ok": False, "error": f"{type(error).__name__}: {error}"})


def run_exchange(numel: int, device_type: str = "cuda", timeout_s: float = 150.0) -> dict:
    """Two ranks exchanging device payloads: NCCL on GPU 0 (which may refuse two ranks on one
    device; the error is then recorded), or gloo on CPU as a smoke test."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if device_type == "cuda" and not dist.is_nccl_available():
        return {"ok": False, "error": "this torch build has no NCCL"}
    context = mp.get_context("spawn")
    queue = context.Queue()
    init_file = os.path.join(tempfile.mkdtemp(prefix="threelc_nccl_"), "init")
    processes = [context.Process(target=_exchange_worker, args=(rank, 2, init_file, numel, device_type, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    reports = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < 2 and time.monotonic() < deadline:
            try:
                reports.append(queue.get(timeout=max(0.1, deadline - time.monotonic())))
            except Exception:
                break
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    if len(reports) < 2:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s ({len(reports)} of 2 ranks reported)"}
    failures = [report["error"] for report in reports if not report["ok"]]
    if failures:
        return {"ok": False, "error": "; ".join(failures)}
    reports.sort(key=lambda report: report["rank"])
    # Every rank must hold the same average, and it must equal the CPU codec's decode of the
    # same payloads (summed in rank order, as the ranks did).
    expected = np.zeros(numel, np.float32)
    for payload in reports[0]["payloads"]:
        threelc.decompress_add(payload, expected)
    expected /= np.float32(2)
    same = all(report["average"].tobytes() == reports[0]["average"].tobytes() for report in reports)
    return {
        "ok": True,
        "ranks_agree": same,
        "matches_cpu_codec": reports[0]["average"].tobytes() == expected.tobytes(),
        "payload_bytes": reports[0]["payload_bytes"],
        "step_ms": [report["step_ms"] for report in reports],
    }


def _print_table(report: dict) -> None:
    print(f"device: {report['device_name']} ({report['device']}), torch {report['torch']}, "
          f"{report['numel']} float32 values, sparsity {report['sparsity']}")
    throughput = report.get("throughput")
    if throughput is None:
        print(f"throughput: failed ({report['throughput_error']})")
    else:
        print(f"one bucket of {throughput['segments']} segments; GB/s count float32 input bytes")
        print(f"{'operation':24s} {'ms':>9s} {'GB/s':>9s} {'x copy':>8s}")
        rows = [("device copy", "copy"), ("encode (+residual)", "encode"),
                ("encode fused (compile)", "encode_fused"), ("decode (checked)", "decode"),
                ("decode (unchecked)", "decode_unchecked"), ("numba CPU encode", "numba_encode"),
                ("numba CPU decode", "numba_decode")]
        for label, key in rows:
            ratio = throughput["copy_ms"] / throughput[f"{key}_ms"]
            print(f"{label:24s} {throughput[key + '_ms']:9.3f} {throughput[key + '_gbps']:9.1f} {ratio:8.3f}")
        print(f"decode (accumulate)      {throughput['decode_accumulate_ms']:9.3f}")
        if throughput["encode_fused_error"]:
            print(f"encode fused: not measured ({throughput['encode_fused_error'][:200]})")
        print(f"compression ratio {throughput['compression_ratio']:.1f}x; target >= {TARGET_RATIO} x copy: "
              f"encode {'met' if report['encode_meets_target'] else 'MISSED'}, "
              f"encode fused {'met' if report['encode_fused_meets_target'] else 'MISSED'}, "
              f"decode {'met' if report['decode_meets_target'] else 'MISSED'}")
    for case in report["identity"]:
        if "error" in case:
            verdict = f"FAILED: {case['error'][:200]}"
        else:
            differs = [key for key in ("payload_identical", "residual_identical", "decode_identical") if not case[key]]
            verdict = "identical" if not differs else "DIFFERS: " + ", ".join(differs)
        print(f"identity {case['case']:28s} {case['values']:9d} values: {verdict}")
    nccl = report["nccl"]
    if nccl.get("skipped"):
        print("nccl: skipped")
    elif nccl["ok"]:
        print(f"nccl 2 ranks on one GPU: ranks agree {nccl['ranks_agree']}, matches CPU codec "
              f"{nccl['matches_cpu_codec']}, step ms {', '.join(f'{t:.2f}' for t in nccl['step_ms'])}")
    else:
        print(f"nccl 2 ranks on one GPU: not run ({nccl['error']}); the codec figures stand alone")


def main(argv=None) -> int:
    """Run the check; returns 0 if every identity holds, 1 if not, 2 if there is no device."""
    parser = argparse.ArgumentParser(prog="python3 -m threelc.launch.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run of the script")
    parser.add_argument("--numel", type=int, default=64 << 20, help="values in the timed bucket (default 64M)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per operation (median reported)")
    parser.add_argument("--sparsity", type=float, default=1.5)
    parser.add_argument("--nccl-numel", type=int, default=8 << 20, help="values per rank in the NCCL run")
    parser.add_argument("--no-nccl", action="store_true", help="skip the 2-process NCCL run")
    parser.add_argument("--no-fuse", action="store_true", help="skip the torch.compile (fuse=True) variant")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available to this torch "
              f"({torch.__version__}); nothing was measured. Run it on a GPU machine, or use "
              "--device cpu --numel 20000 for a smoke run of the script.", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else socket.gethostname()
    report = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "numel": args.numel,
        "sparsity": args.sparsity,
        "target_ratio": TARGET_RATIO,
    }
    # Each step records its own failure, so one surprise on the GPU does not lose the others.
    report["identity"] = check_identity(device, args.numel)
    if not args.no_fuse:
        report["identity"] += check_identity(device, args.numel, fuse=True)
    report["identical"] = all(case.get("payload_identical") and case.get("residual_identical")
                              and case.get("decode_identical") for case in report["identity"])
    try:
        throughput = measure_throughput(device, args.numel, args.repeats, args.sparsity, fuse=not args.no_fuse)
        report["throughput"] = throughput
        report.update(
            encode_gbps=throughput["encode_gbps"], decode_gbps=throughput["decode_gbps"],
            copy_gbps=throughput["copy_gbps"],
            encode_meets_target=throughput["encode_ratio"] >= TARGET_RATIO,
            encode_fused_meets_target=throughput["encode_fused_ratio"] >= TARGET_RATIO,
            decode_meets_target=throughput["decode_ratio"] >= TARGET_RATIO,
        )
    except Exception as error:
        report["throughput_error"] = f"{type(error).__name__}: {error}"
    if args.no_nccl or device.type != "cuda":
        report["nccl"] = {"skipped": True}
    else:
        report["nccl"] = run_exchange(args.nccl_numel)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    _print_table(report)
    nccl_ok = report["nccl"].get("skipped") or not report["nccl"]["ok"] or (
        report["nccl"]["ranks_agree"] and report["nccl"]["matches_cpu_codec"])
    if "throughput_error" in report:
        return 1
    return 0 if report["identical"] and nccl_ok else 1


if __name__ == "__main__":
    sys.exit(main())
