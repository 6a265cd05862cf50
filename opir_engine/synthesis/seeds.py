"""How one seed becomes independent random streams.

Every draw comes from a `numpy.random.Generator` seeded by (stream word, seed, ...): the leading
word keeps the parameters, the random fields, a folder's shuffle and its per-pair seeds apart,
so they never share draws.
"""

from __future__ import annotations

import numpy as np

from opir_engine.synthesis.errors import InvalidSeedError

PARAM_STREAM, FIELD_STREAM, SHUFFLE_STREAM, PAIR_STREAM = 0, 1, 2, 3


def check_seed(seed: int) -> None:
    """Raise `InvalidSeedError` unless `seed` is a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidSeedError(f"seed {seed!r}: expected a non-negative integer")


def split_seed(seed: int) -> tuple[np.random.Generator, int]:
    """Parameter generator and field seed, both derived from one seed and independent."""
    check_seed(seed)
    params_rng = np.random.default_rng([PARAM_STREAM, seed])
    field_seed = int(np.random.SeedSequence([FIELD_STREAM, seed]).generate_state(1, np.uint64)[0])
    return params_rng, field_seed


def field_seed(seed: int) -> int:
    """The seed `synthesize(..., seed)` passes to `apply_*` for its random fields."""
    return split_seed(seed)[1]
