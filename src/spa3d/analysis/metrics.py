"""Agreement between two labellings of the same particles."""

from __future__ import annotations

import numpy as np
from scipy.special import comb


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): 1 for identical partitions, ~0 for random ones.

    Labels are any integers; the numbering of the classes does not matter.
    """
    a = np.unique(np.asarray(labels_true), return_inverse=True)[1]
    b = np.unique(np.asarray(labels_pred), return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    n = len(a)
    sum_cells = comb(table, 2).sum()
    sum_a = comb(table.sum(1), 2).sum()
    sum_b = comb(table.sum(0), 2).sum()
    expected = sum_a * sum_b / comb(n, 2)
    top = 0.5 * (sum_a + sum_b)
    if top == expected:
        return 1.0
    return float((sum_cells - expected) / (top - expected))
