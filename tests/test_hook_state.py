"""ThreeLCState and the hook's helpers, in one process (no process group needed)."""

import json
import pickle

import numpy as np
import pytest
import torch

from threelc.hooks import STAT_KEYS, ThreeLCState
from threelc.hooks.collectives import segments_in_range, shard_bounds
from threelc.hooks.stats import HookStats


@pytest.mark.parametrize("options, words", [
    ({"sparsity": 2.0}, "sparsity"),
    ({"sparsity": 0.0}, "sparsity"),
    ({"sparsity": -1.0}, "sparsity"),
    ({"sparsity": float("nan")}, "sparsity"),
    ({"sparsity": "1"}, "sparsity"),
    ({"sparsity": True}, "sparsity"),
    ({"collective": "ring"}, "collective"),
    ({"scale": "row"}, "scale"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 2.5}, "block_size"),
    ({"start_iter": 1}, "rebuilds its buckets"),
    ({"start_iter": 0}, "start_iter"),
    ({"min_numel": -1}, "min_numel"),
    ({"error_feedback": 1}, "error_feedback"),
    ({"stats_dir": 3}, "stats_dir"),
    ({"stats_every": 0}, "stats_every"),
    ({"stats_every": 1.5}, "stats_every"),
    ({"stats_max_bytes": 0}, "stats_max_bytes"),
    ({"codec_threads": 0}, "codec_threads"),
    ({"codec_threads": 1.5}, "codec_threads"),
])
def test_bad_options_raise_value_error_that_says_why(options, words):
    with pytest.raises(ValueError, match=words):
        ThreeLCState(**options)


def test_defaults_and_repr():
    state = ThreeLCState()
    assert state.config() == {"sparsity": 1.0, "collective": "auto", "coalesce": "auto", "header": "auto",
                              "scale": "block",
                              "block_size": None,
                              "start_iter": 10, "min_numel": 1024, "error_feedback": True, "stats_dir": None,
                              "stats_every": 1, "stats_max_bytes": None}
    assert repr(state).startswith("ThreeLCState(sparsity=1.0, collective='auto'")
    assert state.resolved_collective(2) == "allgather"
    assert state.resolved_collective(3) == "auto"  # decided at the first compressed bucket (threelc.hooks.plan)
    assert state.plan() is None
    assert ThreeLCState(collective="scatter_reduce").resolved_collective(2) == "scatter_reduce"
    assert state.resolved_block_size() == 8192 and state.codec_options()["block"] == 8192


def test_block_size_follows_a_paired_momentum_optimizer_unless_given():
    """An unset block_size is the paired optimizer's hook_block_size (512 when it compresses
    momentum); a block_size given to the state wins; with scale="tensor" there are no blocks."""
    import threelc.optim
    from threelc.hooks import codecs

    def paired(state, **options):
        state.optimizer = threelc.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], **options)
        return state

    assert paired(ThreeLCState(), compress="momentum").codec_options()["block"] == 512
    assert paired(ThreeLCState(), compress="update").codec_options()["block"] == 512
    assert paired(ThreeLCState(), compress="gradient").codec_options()["block"] == 8192
    assert paired(ThreeLCState(block_size=4096), compress="momentum").codec_options()["block"] == 4096
    assert paired(ThreeLCState(scale="tensor"), compress="momentum").codec_options()["block"] is None
    assert "block_size=512 " in paired(ThreeLCState(), compress="momentum").fingerprint_text(2, 0)
    for codec in ("numba", "torch"):  # what the hook's bucket codec is built with
        state = paired(ThreeLCState(codec=codec), compress="momentum")
        assert codecs.for_bucket(state, torch.zeros(8)).block == 512
    assert ThreeLCState(**ThreeLCState().config()).block_size is None  # config() round-trips the unset value


def test_stats_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("THREELC_STATS_DIR", str(tmp_path))
    assert ThreeLCState().stats_dir == str(tmp_path)
    assert ThreeLCState(stats_dir=str(tmp_path / "x")).stats_dir == str(tmp_path / "x")


def test_residuals_follow_bucket_layout_and_come_back_after_a_rebuild():
    state = ThreeLCState()
    first = state.residual_for(0, (3, 4), 7, None)
    first.worker[:] = 1.0
    assert state.residual_for(0, (3, 4), 7, None) is first
    # A new layout gets fresh zero residuals; the old ones are set aside, not lost...
    other = state.residual_for(0, (7,), 7, None)
    assert other is not first and not other.worker.any()
    # ...and return when the layout does (DDP's first step after a restart, then the rebuild).
    assert state.residual_for(0, (3, 4), 7, None) is first
    assert state.residual_for(0, (3, 4), 7, (3, 7)).server.shape == (4,)


def test_named_residuals_follow_parameters_across_layouts_and_checkpoints():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))  # sizes 6, 3, 3, 1
    state = ThreeLCState()
    state.bind_parameters(module)
    weight0, bias0, weight1, bias1 = module.parameters()
    # Rebuilt layout: two buckets in gradient-ready order.
    names_a = state.parameter_names([bias1, weight1], 0, 0)
    names_b = state.parameter_names([bias0, weight0], 1, 0)
    assert names_a == ("1.bias", "1.weight")
    state.residual_for(0, (1, 3), 4, names=names_a).worker[:] = torch.tensor([1.0, 2, 3, 4])
    state.residual_for(1, (3, 6), 9, names=names_b).worker[:] = torch.arange(10, 19)
    saved = state.state_dict()

    # A fresh process: DDP's first iteration has one bucket in registration order.
    resumed = ThreeLCState()
    resumed.bind_parameters(module)
    resumed.load_state_dict(saved)
    names_initial = resumed.parameter_names([weight0, bias0, weight1, bias1], 0, 0)
    initial = resumed.residual_for(0, (6, 3, 3, 1), 13, names=names_initial)
    np.testing.assert_array_equal(initial.worker, [13, 14, 15, 16, 17, 18, 10, 11, 12, 2, 3, 4, 1])
    initial.worker += 100
    # The rebuild brings the updated values back into the two-bucket layout.
    np.testing.assert_array_equal(resumed.residual_for(0, (1, 3), 4, names=names_a).worker, [101, 102, 103, 104])
    np.testing.assert_array_equal(resumed.residual_for(1, (3, 6), 9, names=names_b).worker,
                                  np.arange(110, 119))
    # Unknown parameters: no names, residuals keyed by bucket only.
    assert resumed.parameter_names([torch.nn.Parameter(torch.zeros(2))], 0, 0) is None


def test_server_residual_folds_into_the_worker_residual_when_the_shard_moves():
    state = ThreeLCState(collective="scatter_reduce")
    entry = state.residual_for(0, (8,), 8, (4, 8), world_size=4)
    entry.worker[:] = 1.0
    entry.server[:] = 0.5
    # Owed to the mean: mean of worker residuals + server residual.  Moving the shard keeps it.
    moved = state.residual_for(0, (8,), 8, (0, 4), world_size=4)
    np.testing.assert_array_equal(moved.worker, [1, 1, 1, 1, 3, 3, 3, 3])
    np.testing.assert_array_equal(moved.server, np.zeros(4))


def test_state_dict_round_trip_and_pickle_drops_the_process_group():
    state = ThreeLCState(process_group=object(), sparsity=1.25, collective="scatter_reduce")
    entry = state.residual_for(2, (5, 5), 10, (5, 10))
    entry.worker[:] = torch.arange(10)
    entry.server[:] = -1.0
    state.iteration = 17
    saved = state.state_dict()
    assert saved["iteration"] == 17 and saved["config"]["sparsity"] == 1.25
    assert torch.equal(saved["residuals"][2]["worker"], torch.arange(10, dtype=torch.float32))

    restored = ThreeLCState(sparsity=1.25, collective="scatter_reduce")
    restored.load_state_dict(saved)
    assert restored.iteration == 17
    np.testing.assert_array_equal(restored.residual_for(2, (5, 5), 10, (5, 10)).worker, np.arange(10))
    np.testing.assert_array_equal(restored.residual_for(2, (5, 5), 10, (5, 10)).server, -np.ones(5))

    # Residuals set aside by a layout change travel too.
    state.residual_for(2, (10,), 10, (5, 10))
    parked = ThreeLCState(sparsity=1.25, collective="scatter_reduce")
    parked.load_state_dict(state.state_dict())
    np.testing.assert_array_equal(parked.residual_for(2, (5, 5), 10, (5, 10)).worker, np.arange(10))
    state.residual_for(2, (5, 5), 10, (5, 10))

    unpickled = pickle.loads(pickle.dumps(state))
    assert unpickled.process_group is None
    assert unpickled.config() == state.config() and unpickled.iteration == 17
    np.testing.assert_array_equal(unpickled.residual_for(2, (5, 5), 10, (5, 10)).worker, np.arange(10))


def test_load_state_dict_rejects_unknown_version():
    with pytest.raises(ValueError, match="version"):
        ThreeLCState().load_state_dict({"version": 99})


@pytest.mark.parametrize("count, world_size", [(0, 3), (2, 4), (10, 3), (1001, 8)])
def test_shard_bounds_cover_the_bucket(count, world_size):
    bounds = shard_bounds(count, world_size)
    assert bounds[0] == 0 and bounds[-1] == count and len(bounds) == world_size + 1
    sizes = np.diff(bounds)
    assert sizes.min() >= 0 and sizes.max() - sizes.min() <= 1


def test_segments_in_range_intersects_parameters_with_shards():
    sizes = [4, 0, 3, 5]
    assert segments_in_range(sizes, 0, 12) == [4, 3, 5]
    assert segments_in_range(sizes, 2, 9) == [2, 3, 2]
    assert segments_in_range(sizes, 5, 6) == [1]
    assert segments_in_range(sizes, 6, 6) == []
    bounds = shard_bounds(12, 5)
    pieces = [segments_in_range(sizes, bounds[j], bounds[j + 1]) for j in range(5)]
    assert [sum(p) for p in pieces] == list(np.diff(bounds))


def test_stats_schema_and_json_lines(tmp_path):
    stats = HookStats(str(tmp_path))
    stats.add_raw(1000)
    stats.add_allreduce(1000, 4)  # ring allreduce: 2 (N - 1) / N of the raw bytes each way
    first = stats.finish_step(0, rank=3, world_size=4)
    assert first["sent_bytes"] == first["received_bytes"] == 1500 and first["compressed"] is False
    stats.add_raw(1000)
    stats.add_traffic(10, 30)
    stats.mark_compressed()
    with stats.timer("compress_s"):
        pass
    stats.finish_step(1, rank=3, world_size=4)
    snapshot = stats.snapshot()
    assert tuple(snapshot["step"]) == STAT_KEYS and tuple(snapshot["total"]) == STAT_KEYS
    assert snapshot["step"]["ratio"] == 100.0 and snapshot["step"]["compressed"] is True
    assert snapshot["total"]["step"] == 2 and snapshot["total"]["raw_bytes"] == 2000
    assert snapshot["total"]["sent_bytes"] == 1510 and snapshot["total"]["received_bytes"] == 1530
    lines = [json.loads(line) for line in (tmp_path / "hook-rank3.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert all(tuple(line) == STAT_KEYS + ("time",) for line in lines)


def test_unwritable_stats_dir_is_a_clear_error_at_construction(tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    with pytest.raises(ValueError, match="stats_dir .*not-a-folder.* cannot be written"):
        ThreeLCState(stats_dir=str(a_file))
    with pytest.raises(ValueError, match="cannot be written"):
        ThreeLCState(stats_dir=str(a_file / "below"))


def test_stats_log_warns_once_when_it_cannot_append(tmp_path, caplog):
    stats = HookStats(str(tmp_path / "log"))
    (tmp_path / "log").rmdir()
    (tmp_path / "log").write_text("")  # the folder became a file after construction
    with caplog.at_level("WARNING", logger="threelc.hooks.stats"):
        for step in range(5):
            stats.finish_step(step, 0, 2)
    assert len(caplog.records) == 1 and "cannot append" in caplog.records[0].getMessage()
    assert stats.snapshot()["total"]["step"] == 5  # statistics in memory go on


def test_stats_log_is_bounded_by_every_and_by_a_size_cap(tmp_path, caplog):
    every = HookStats(str(tmp_path / "every"), every=4)
    for step in range(10):
        every.finish_step(step, 0, 2)
    lines = (tmp_path / "every" / "hook-rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 4, 8]
    capped = HookStats(str(tmp_path / "capped"), max_bytes=1000)
    with caplog.at_level("WARNING", logger="threelc.hooks.stats"):
        for step in range(100):
            capped.finish_step(step, 0, 2)
    path = tmp_path / "capped" / "hook-rank0.jsonl"
    assert 0 < path.stat().st_size <= 1000
    assert len(path.read_text().splitlines()) < 100
    assert len(caplog.records) == 1 and "reached its cap of 1000 bytes" in caplog.records[0].getMessage()


def test_stats_before_any_step_and_with_nothing_sent():
    stats = HookStats(None)
    assert stats.snapshot()["step"]["step"] == -1
    stats.add_raw(8)
    assert stats.finish_step(0, 0, 1)["ratio"] is None  # nothing sent: no ratio, not infinity


def test_codec_threads_are_shared_among_local_workers(monkeypatch):
    import numba

    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * numba.config.NUMBA_NUM_THREADS))
    assert ThreeLCState().codec_threads == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert ThreeLCState().codec_threads == numba.config.NUMBA_NUM_THREADS


def test_worker_runs_codec_kernels_with_codec_threads():
    """numba's thread count is per thread: the hook's worker thread must set its own."""
    import numba

    state = ThreeLCState(codec_threads=1)
    try:
        assert state.worker().submit(numba.get_num_threads).wait() == 1
    finally:
        state.close()
