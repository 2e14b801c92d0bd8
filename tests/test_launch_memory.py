"""`python3 -m threelc.launch.bench.memory` measures what it says (no memory figure is asserted but the
state's own tensors, which are exact)."""

from __future__ import annotations

import numpy as np
import pytest

from threelc.hooks.collectives import shard_bounds
from threelc.launch.bench import memory


@pytest.mark.slow
def test_memory_measure_reports_every_config_and_the_state_tensors(tmp_path):
    results = memory.measure(params=40_000, world_size=2, steps=3, folder=str(tmp_path))
    assert set(results) == set(memory.CONFIGS)
    params = results["allreduce"][0]["params"]
    for config, ranks in results.items():
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["params"] == params and r["peak_rss"] > 0 for r in ranks)
    assert all(r["state_bytes"] == 0 for r in results["allreduce"])
    assert all(r["state_bytes"] == 4 * params for r in results["allgather"])  # one bucket, all compressed
    own_shards = np.diff(shard_bounds(params, 2))
    assert [r["state_bytes"] for r in results["scatter_reduce"]] == [4 * params + 4 * int(n) for n in own_shards]
