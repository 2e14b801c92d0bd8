"""Helpers shared by the launch, emulate and report tests: run torchrun jobs, require the emulator."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["torchrun", "require_emulation", "TINY_DIGITS"]

#: .ci/run sets this: in CI (root) the emulated cluster must run, so a missing requirement fails.
REQUIRE_EMULATION = os.environ.get("THREELC_REQUIRE_EMULATION") == "1"

#: A digits run small enough for a test: ~3.5k parameters, eval twice.
TINY_DIGITS = ["--width", "4", "--batch-size", "16", "--eval-every", "5", "--no-progress"]


def torchrun(nproc: int, module: str, args, *, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone`` on this machine; raise with output on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", module, *map(str, args)]
    for attempt in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        # --standalone picks a free port, closes it, then binds it again: on a busy machine
        # another process can take it in between. That is the launcher's race, not ours: retry once.
        if result.returncode == 0 or "address already in use" not in (result.stdout + result.stderr).lower():
            break
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def require_emulation() -> None:
    """Skip the calling test where the emulated cluster cannot run, or fail if CI requires it."""
    import pytest

    from threelc.launch.cluster import netns

    try:
        netns.check_requirements()
    except netns.EmulationUnavailable as error:
        if REQUIRE_EMULATION:
            pytest.fail(f"THREELC_REQUIRE_EMULATION=1 but the emulated cluster cannot run: {error}")
        pytest.skip(str(error))
