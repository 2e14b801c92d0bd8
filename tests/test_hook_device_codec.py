"""The hook on the torch (device) codec: forced with ``codec="torch"`` on CPU buckets and gloo.

The torch codec writes the same bytes as the numba codec, so everything the hook computes with
it must be bitwise what it computes with the numba codec: DDP training runs end with identical
parameters, replicas agree, and non-finite gradients still poison the bucket on every rank and
roll the residuals back.  One spawn per world size runs every case; the tests assert on parts.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import threelc
from threelc.hooks import ThreeLCState, codecs, device_codec, register

from _dist import run_ranks
from test_hook_exact import gradient, run_hook

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLLECTIVES = ("allgather", "scatter_reduce")
STEPS = 6
LAYOUT = (300, 5, 1200, 40)


def _codec_for(rank, codec):
    """The codec a rank runs; with "mixed", odd ranks run torch and even ranks numba."""
    return ("torch" if rank % 2 else "numba") if codec == "mixed" else codec


def _count_codec_calls():
    """Wrap both codecs' compress functions (as the hook's codec adapters call them) to count calls."""
    counts = {"numba": 0, "torch": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    threelc.compress = counting("numba", threelc.compress)
    device_codec.compress_tensor = counting("torch", device_codec.compress_tensor)
    return counts


def _train(rank, collective, dtype, codec):
    """A few DDP steps (several buckets, warm-up then compressed); the parameters after them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    model = model.to(DTYPES[dtype])
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = register(ddp, collective=collective, scale="block", block_size=100, start_iter=2, min_numel=64,
                     codec=codec)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(STEPS):
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(1000 * rank + step)
        batch = torch.randn(8, 16, generator=generator).to(DTYPES[dtype])
        ddp(batch).float().pow(2).mean().backward()
        optimizer.step()
    residuals = [(entry.worker.device.type, entry.worker.dtype) for entry in state._residuals.values()]
    compressed = state.stats()["total"]["compressed"]
    state.close()
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]), residuals, compressed


def _nonfinite(rank, world_size, collective, dtype, codec):
    """Three clean steps, one with an Inf on the last rank, one clean step after it."""
    state = ThreeLCState(collective=collective, codec=codec, scale="block", block_size=64, sparsity=1.25,
                         start_iter=2, min_numel=0)
    state.iteration = 2
    for step in range(3):
        run_hook(state, gradient(rank, step, LAYOUT, DTYPES[dtype]), LAYOUT)
    entry = state._residuals[0]
    saved = [None if r is None else r.clone() for r in (entry.worker, entry.server)]
    poisoned = gradient(rank, 3, LAYOUT, DTYPES[dtype])
    if rank == world_size - 1:
        poisoned[7] = float("inf")
    result = run_hook(state, poisoned, LAYOUT)
    rolled_back = all((a is None and b is None) or torch.equal(a, b)
                      for a, b in zip(saved, (entry.worker, entry.server)))
    after = run_hook(state, gradient(rank, 4, LAYOUT, DTYPES[dtype]), LAYOUT)
    state.close()
    return {"all_nan": bool(torch.isnan(result).all()), "rolled_back": rolled_back,
            "nonzero_residual": bool(saved[0].any()), "after": after.float(), "residual": entry.worker.clone()}


def device_codec_checks(rank, world_size):
    counts = _count_codec_calls()
    results = {"train": {}, "nonfinite": {}}
    for collective in COLLECTIVES:
        for dtype in DTYPES:
            for codec in ("numba", "torch", "mixed"):
                before = dict(counts)
                parameters, residuals, compressed = _train(rank, collective, dtype, _codec_for(rank, codec))
                calls = {name: counts[name] - before[name] for name in counts}
                results["train"][(collective, dtype, codec)] = {
                    "parameters": parameters, "residuals": residuals, "compressed": compressed, "calls": calls}
            for codec in ("numba", "torch"):
                results["nonfinite"][(collective, dtype, codec)] = _nonfinite(rank, world_size, collective, dtype,
                                                                               codec)
    dist.barrier()
    return results


@pytest.fixture(scope="module", params=[2, 4])
def checks(request):
    world_size = request.param
    return world_size, run_ranks(device_codec_checks, world_size, timeout_s=360)


def test_torch_codec_training_is_bitwise_the_numba_codec_and_replicas_agree(checks):
    world_size, results = checks
    for collective in COLLECTIVES:
        for dtype in DTYPES:
            key = (collective, dtype)
            reference = results[0]["train"][(*key, "numba")]["parameters"]
            for rank, result in enumerate(results):
                for codec in ("numba", "torch", "mixed"):
                    run = result["train"][(*key, codec)]
                    assert run["compressed"], (world_size, key, codec)
                    # Replicas agree, and the torch codec changes no bit of the result.
                    assert torch.equal(run["parameters"], reference), (world_size, rank, key, codec)
            assert torch.isfinite(reference).all()


def test_torch_codec_is_the_one_that_ran(checks):
    world_size, results = checks
    for rank, result in enumerate(results):
        for (collective, dtype, codec), run in result["train"].items():
            used = _codec_for(rank, codec)
            other = "numba" if used == "torch" else "torch"
            assert run["calls"][used] > 0 and run["calls"][other] == 0, (world_size, rank, collective, dtype, codec)
            # Residuals are float32 tensors; on a CPU bucket they live in host memory either way.
            assert run["residuals"] and all(r == ("cpu", torch.float32) for r in run["residuals"])


def test_nonfinite_gradients_poison_every_rank_and_roll_back_with_the_torch_codec(checks):
    world_size, results = checks
    for collective in COLLECTIVES:
        for dtype in DTYPES:
            for rank, result in enumerate(results):
                torch_run = result["nonfinite"][(collective, dtype, "torch")]
                numba_run = result["nonfinite"][(collective, dtype, "numba")]
                for run in (torch_run, numba_run):
                    assert run["all_nan"], (world_size, rank, collective, dtype)
                    assert run["rolled_back"] and run["nonzero_residual"], (world_size, rank, collective, dtype)
                # The step after the skipped one is bitwise the same with both codecs.
                assert torch.isfinite(torch_run["after"]).all()
                assert torch.equal(torch_run["after"], numba_run["after"]), (world_size, rank, collective, dtype)
                assert torch.equal(torch_run["residual"], numba_run["residual"]), (world_size, rank, collective)
                assert torch.equal(torch_run["after"], results[0]["nonfinite"][(collective, dtype, "torch")]["after"])


def test_codec_option_is_validated_and_auto_picks_by_device():
    with pytest.raises(ValueError, match="codec must be one of"):
        ThreeLCState(codec="cuda")
    assert ThreeLCState().codec == "auto"
    cpu = torch.zeros(4)
    assert isinstance(codecs.for_bucket(ThreeLCState(), cpu), codecs.NumbaCodec)
    assert isinstance(codecs.for_bucket(ThreeLCState(codec="torch"), cpu), codecs.TorchCodec)
    assert isinstance(codecs.for_bucket(ThreeLCState(codec="numba"), cpu), codecs.NumbaCodec)
    assert codecs.resolve("auto", torch.device("cuda", 0)) == "torch"
    assert codecs.resolve("numba", torch.device("cuda", 0)) == "numba"
    # Per process: not part of the cross-rank configuration check, kept by pickling.
    state = ThreeLCState(codec="torch")
    assert "codec" not in state.fingerprint_text(2, 0)
    import pickle
    assert pickle.loads(pickle.dumps(state)).codec == "torch"


def test_torch_codec_residuals_survive_a_state_dict_round_trip():
    state = ThreeLCState(codec="torch", collective="scatter_reduce")
    entry = state.residual_for(0, (5, 5), 10, (5, 10), device=torch.device("cpu"))
    entry.worker.copy_(torch.arange(10.0))
    entry.server.fill_(-1.0)
    saved = state.state_dict()
    assert saved["residuals"][0]["worker"].device.type == "cpu"
    assert saved["residuals"][0]["worker"].data_ptr() != entry.worker.data_ptr()
    restored = ThreeLCState(codec="torch", collective="scatter_reduce")
    restored.load_state_dict(saved)
    again = restored.residual_for(0, (5, 5), 10, (5, 10), device=torch.device("cpu"))
    assert torch.equal(again.worker, torch.arange(10.0)) and torch.equal(again.server, -torch.ones(5))
    np.testing.assert_array_equal(again.worker.numpy(), np.arange(10))


@pytest.mark.parametrize("segments,expect_kept", [((3000, 5, 2000), True), ((1, 2, 1, 3), False), (None, True)])
def test_codecs_compress_with_the_residual_alike_kept_or_not(segments, expect_kept):
    """The numba codec writes the new residual over the values where no raw fallback can happen
    (``kept``: feedback copies it); the torch codec adds the residual and decodes in feedback.
    Either way the payload and the residual after feedback are bit for bit the same."""
    rng = np.random.default_rng(5)
    count = 5005 if segments is None else sum(segments)
    gradient_values = (rng.standard_t(3, count) * 1e-2).astype(np.float32)
    residual_values = (rng.standard_t(3, count) * 1e-3).astype(np.float32)
    results = {}
    for name, codec in (("numba", codecs.NumbaCodec(1.0, 100, segments is None, torch.device("cpu"))),
                        ("torch", codecs.TorchCodec(1.0, 100, segments is None, torch.device("cpu")))):
        values = torch.from_numpy(gradient_values.copy())
        residual = torch.from_numpy(residual_values.copy())
        view, residual_view = codec.array(values), codec.array(residual)
        payload, nonfinite, kept = codec.compress(view, None if segments is None else list(segments), residual_view)
        assert not nonfinite
        assert torch.equal(residual, torch.from_numpy(residual_values)), "the residual waits for feedback"
        codec.feedback(view, payload, residual_view, kept)
        results[name] = (bytes(np.asarray(payload.cpu() if torch.is_tensor(payload) else payload)),
                         residual.numpy().tobytes(), kept)
    assert results["numba"][2] is expect_kept and results["torch"][2] is False
    assert results["numba"][:2] == results["torch"][:2]
    expected_residual = residual_values.copy()
    expected = threelc.compress(gradient_values, residual=expected_residual, block=100,
                                segments=None if segments is None else list(segments))
    if expect_kept:  # a raw fallback sends the values themselves (residual 0): not the codec's bytes
        assert results["numba"][0] == expected.tobytes()
        assert results["numba"][1] == expected_residual.tobytes()
