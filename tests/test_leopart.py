"""Leopart CBFE + community detection: every step against a brute-force definition, Infomap for real, the
one-process run end to end on real Weizmann-horse images, prediction from the saved model, bad inputs.

The Ray executor (same maps, bit for bit) is in ``test_leopart_ray.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared_data

from transfgu.leopart import cbfe
from transfgu.leopart.communities import (
    community_map,
    cooccurrence_matrix,
    cooccurrence_stats,
    detect_communities,
    glcm_offsets,
    network_edges,
)

REPO = Path(__file__).resolve().parents[1]


# -- brute-force oracles -------------------------------------------------------------------------------------------
def brute_cooccurrence(maps: np.ndarray, n: int, offsets) -> tuple[np.ndarray, np.ndarray]:
    """Per image: pair counts by a loop over pixels and offsets, diagonal zeroed, rows normalised; then summed."""
    total = np.zeros((n, n))
    present = np.zeros(n, dtype=np.int64)
    for m in maps:
        h, w = m.shape
        c = np.zeros((n, n))
        for r in range(h):
            for q in range(w):
                for dr, dc in offsets:
                    rr, qq = r + dr, q + dc
                    if 0 <= rr < h and 0 <= qq < w:
                        c[m[r, q], m[rr, qq]] += 1
        np.fill_diagonal(c, 0)
        for i in range(n):
            s = c[i].sum()
            if s > 0:
                c[i] /= s
        total += c
        for i in set(m.ravel().tolist()):
            present[i] += 1
    return total, present


def test_glcm_offsets_are_skimage_8_neighbourhood_at_distances_1_and_2():
    off = glcm_offsets((1, 2), 8)
    assert len(off) == 16
    assert set(off[:8]) == {(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)}
    # skimage rounds sin/cos * d: the diagonal at distance 2 is (1, 1), not (2, 2)
    assert (0, 2) in off[8:] and (2, 0) in off[8:] and (1, 1) in off[8:] and (2, 2) not in off


@pytest.mark.parametrize("n", [6, 300])  # 300 > 256: the authors' GLCM asserts at most 256 clusters
def test_cooccurrence_matches_brute_force(n):
    rng = np.random.default_rng(n)
    maps = rng.integers(0, n, size=(4, 9, 11))
    maps[1] = rng.integers(0, 3, size=(9, 11))  # few nodes: many absent rows
    maps[2] = 1  # one node only: its row is all zero but it still counts as present
    off = glcm_offsets()
    s, c = cooccurrence_stats(maps, n, off)
    bs, bc = brute_cooccurrence(maps, n, off)
    np.testing.assert_allclose(s, bs, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(c, bc)
    # additive over shards: two calls sum to one
    s1, c1 = cooccurrence_stats(maps[:2], n, off)
    s2, c2 = cooccurrence_stats(maps[2:], n, off)
    np.testing.assert_allclose(s1 + s2, s, atol=1e-12)
    m = cooccurrence_matrix(s, c)
    rows = m.sum(axis=1)
    assert np.all((np.abs(rows - 1) < 1e-9) | (rows <= 1))  # averages of stochastic (or zero) rows


def test_cooccurrence_rejects_bad_ids():
    with pytest.raises(ValueError, match="node ids"):
        cooccurrence_stats(np.full((1, 3, 3), 5), 5, glcm_offsets())


def test_network_edges_need_both_directions():
    m = np.array([[0, 0.5, 0.2], [0.3, 0, 0.01], [0.9, 0.2, 0]])
    assert network_edges(m, 0.1) == [(0, 1, 0.3), (0, 2, 0.2)]
    assert network_edges(m, 0.25) == [(0, 1, 0.3)]


def test_precision_per_cluster_matches_brute_force():
    rng = np.random.default_rng(0)
    k = 7
    labels = [rng.integers(0, k, size=n) for n in (30, 1, 50, 12)]
    labels[1][:] = 6
    masks = [rng.random(len(lab)) < 0.4 for lab in labels]
    s, n = cbfe.precision_stats(labels, masks, k)
    for c in range(k):
        precs = [m[lab == c].mean() for lab, m in zip(labels, masks) if (lab == c).any()]
        assert n[c] == len(precs)
        assert s[c] == pytest.approx(sum(precs))
    p = cbfe.cluster_precision(s, n)
    np.testing.assert_array_equal(cbfe.foreground_clusters(p, 0.4), p >= 0.4)


def test_paper_threshold_matches_brute_force_cut_search():
    rng = np.random.default_rng(1)
    k = 20
    lab = rng.integers(0, k, size=4000)
    gt = np.where(rng.random(4000) < 0.1, -1, (rng.random(4000) < (lab / k)).astype(int))
    precision = rng.random(k)
    pix, fg = cbfe.cut_stats([lab], [gt], k)
    thr, ious = cbfe.paper_threshold(precision, pix, fg)
    order = np.argsort(precision, kind="stable")
    best = None
    for cut in range(11, 16):  # 55 % .. 75 % of 20 clusters in the background
        fg_set = set(order[cut:].tolist())
        pred = np.array([c in fg_set for c in lab])
        valid = gt >= 0
        inter = np.sum(pred & (gt == 1) & valid)
        union = np.sum((pred | (gt == 1)) & valid)
        assert ious[cut] == pytest.approx(inter / union)
        if best is None or inter / union > best[1]:
            best = (cut, inter / union)
    assert thr == pytest.approx(round(round(precision[order[best[0]]] / 0.05) * 0.05, 2))


# -- Infomap, for real ---------------------------------------------------------------------------------------------
def test_infomap_finds_planted_communities_and_background_is_segment_zero():
    # two 4-cliques {0..3}, {4..7} joined by one weak edge; the background node 8 hangs on clique 2; node 9 isolated
    edges = [(i, j, 1.0) for g in ((0, 1, 2, 3), (4, 5, 6, 7)) for a, i in enumerate(g) for j in g[a + 1 :]]
    edges += [(3, 4, 0.05), (8, 5, 0.9), (8, 6, 0.9)]
    comm = detect_communities(10, edges, markov_time=1.0, n_modules=2, seed=0)
    assert comm.codelength > 0
    mods = comm.modules
    assert len({mods[i] for i in range(4)}) == 1 and len({mods[i] for i in range(4, 8)}) == 1
    assert mods[0] != mods[4] and 9 not in mods
    seg = community_map(10, mods, bg_node=8)
    assert seg[8] == 0 and seg[9] == 0  # background node's community and the isolated node
    assert set(seg[:4]) == {1}  # the other community is segment 1
    # breaking the structure (random weights, no cliques) no longer recovers the planted split
    rng = np.random.default_rng(0)
    noisy = [(i, j, float(rng.random())) for i in range(8) for j in range(i + 1, 8)]
    m2 = detect_communities(10, noisy, markov_time=1.0, n_modules=2, seed=0).modules
    assert not (len({m2[i] for i in range(4)}) == 1 and len({m2[i] for i in range(4, 8)}) == 1 and m2[0] != m2[4])


def test_planted_parts_are_merged_by_cooccurrence_and_infomap():
    """Objects made of parts: a 'horse' of clusters {0, 1, 2} and a 'car' of {3, 4} on background 5. The
    co-occurrence network + Infomap must merge the parts of each object, and must not when parts are shuffled
    independently of objects (the test fails if the method is broken)."""
    rng = np.random.default_rng(0)

    def image(obj: int) -> np.ndarray:
        m = np.full((20, 20), 5)
        parts = (0, 1, 2) if obj == 0 else (3, 4)
        r, c = rng.integers(2, 8, size=2)
        for i, p in enumerate(parts):
            m[r + 3 * i : r + 3 * i + 3, c : c + 8] = p
        return m

    maps = np.stack([image(i % 2) for i in range(40)])
    s, n = cooccurrence_stats(maps, 6, glcm_offsets())
    comm = detect_communities(6, network_edges(cooccurrence_matrix(s, n), 0.05), 1.0, 2, seed=0)
    seg = community_map(6, comm.modules, bg_node=5)
    assert seg[0] == seg[1] == seg[2] != seg[3] and seg[3] == seg[4]
    shuffled = maps.copy()
    for m in shuffled:  # parts of both objects mixed in every image: no object structure left
        obj = m < 5
        m[obj] = rng.integers(0, 5, size=int(obj.sum()))
    s, n = cooccurrence_stats(shuffled, 6, glcm_offsets())
    comm = detect_communities(6, network_edges(cooccurrence_matrix(s, n), 0.05), 1.0, 2, seed=0)
    seg = community_map(6, comm.modules, bg_node=5)
    assert not (seg[0] == seg[1] == seg[2] != seg[3] and seg[3] == seg[4])
