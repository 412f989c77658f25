"""Brute-force definitions that more than one test module checks the package against."""

from __future__ import annotations

import math


def naive_sinkhorn(scores: list[list[float]], eps: float, n_iters: int) -> list[list[float]]:
    """Element by element, in float64: the textbook alternate row/column scaling of exp(S / eps)^T."""
    n, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][c] / eps) for i in range(n)] for c in range(k)]  # (K, N)
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iters):
        for c in range(k):
            s = sum(q[c])
            q[c] = [v / s / k for v in q[c]]
        for i in range(n):
            s = sum(q[c][i] for c in range(k))
            for c in range(k):
                q[c][i] = q[c][i] / s / n
    return [[q[c][i] * n for c in range(k)] for i in range(n)]
