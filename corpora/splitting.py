"""Train/validation split grouped by PMID, reproducible from a seed.

Grouping by PMID guarantees that no citation (or any version of it) is in both splits, which would leak
validation text into fine-tuning. Groups are sorted before the seeded shuffle, so the split depends only on the
set of PMIDs and the seed, not on the order the inputs were read in.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from corpora.errors import CorpusError


def _sort_key(group: str) -> tuple[int, int | str]:
    return (0, int(group)) if group.isdigit() else (1, group)


def split_groups(groups: Iterable[str], validation_fraction: float = 0.2, seed: int = 42
                 ) -> tuple[set[str], set[str]]:
    """(train, validation) sets of group keys; validation holds ``round(n * fraction)`` groups.

    With at least two groups and a fraction strictly between 0 and 1, both splits are non-empty.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise CorpusError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    ordered = sorted(set(groups), key=_sort_key)
    random.Random(seed).shuffle(ordered)
    n_val = round(len(ordered) * validation_fraction)
    if validation_fraction > 0 and len(ordered) >= 2:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    return set(ordered[n_val:]), set(ordered[:n_val])
