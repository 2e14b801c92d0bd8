"""A shared list of awkward float32 arrays that every codec test runs over.

Each entry is (name, array, segments): segments are segment sizes or None (one segment).
The list covers every length mod 5, all zeros, one nonzero, no zeros, zero runs of 1, 2, 14,
15, 16, 29, 70 and 71 groups (the edges of the zero-run code), huge and tiny magnitudes, and
many short segments.
"""

from __future__ import annotations

import numpy as np

FLT_MAX = np.finfo(np.float32).max
TINY = np.finfo(np.float32).smallest_subnormal


def _zero_run(groups: int) -> np.ndarray:
    """A nonzero group, ``groups`` all-zero groups, and a nonzero group again."""
    values = np.zeros(5 * (groups + 2), dtype=np.float32)
    values[:5] = [1.0, -1.0, 0.7, -0.9, 1.0]
    values[-5:] = [-1.0, 1.0, 0.6, -0.6, 1.0]
    return values


def _awkward():
    rng = np.random.default_rng(1234)
    cases = [("empty", np.zeros(0, np.float32), None)]
    for n in range(1, 12):
        cases.append((f"length{n}", rng.standard_normal(n).astype(np.float32), None))
    cases += [
        ("all_zeros", np.zeros(103, np.float32), None),
        ("one_nonzero", np.eye(1, 97, 41, dtype=np.float32)[0] * -3.5, None),
        ("no_zeros", (rng.uniform(0.6, 1.0, 200) * rng.choice([-1, 1], 200)).astype(np.float32), None),
        ("huge", np.array([FLT_MAX, -FLT_MAX, FLT_MAX / 2, 1e38, -3e37, 0, 1], np.float32), None),
        ("tiny", np.array([TINY, -TINY, 2 * TINY, 0, 1e-40, -3e-39, TINY * 7], np.float32), None),
        ("exact_halves", np.array([1.0, 0.5, -0.5, 0.49999997, -0.50000006, 0.25], np.float32), None),
        ("heavy_tailed", (rng.standard_t(3, 1000) * 1e-3).astype(np.float32), None),
        ("many_segments", rng.standard_normal(300).astype(np.float32),
         [1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 11, 34, 200]),
        ("segments_of_one", rng.standard_normal(23).astype(np.float32), [1] * 23),
        ("negative_zero", np.array([-0.0, 0.0, -0.0, 1.0, -0.0], np.float32), None),
    ]
    for groups in (1, 2, 14, 15, 16, 29, 70, 71):
        cases.append((f"zero_run{groups}", _zero_run(groups), None))
    return cases


AWKWARD = _awkward()
AWKWARD_IDS = [name for name, _, _ in AWKWARD]
