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
from helpers.configs import leopart_config
from helpers.data import REPO, require_shared_data

from transfgu.leopart import cbfe
from transfgu.leopart.communities import (
    community_map,
    cooccurrence_matrix,
    cooccurrence_stats,
    detect_communities,
    glcm_offsets,
    network_edges,
)


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
    s, c, _ = cooccurrence_stats(maps, n, off)
    bs, bc = brute_cooccurrence(maps, n, off)
    np.testing.assert_allclose(s, bs, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(c, bc)
    s_chunked, c_chunked, _ = cooccurrence_stats(maps, n, off, max_cells=1)  # one image per bincount
    np.testing.assert_allclose(s_chunked, bs, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(c_chunked, bc)
    # additive over shards: two calls sum to one
    s1, c1, _ = cooccurrence_stats(maps[:2], n, off)
    s2, c2, _ = cooccurrence_stats(maps[2:], n, off)
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
    s, n, _ = cooccurrence_stats(maps, 6, glcm_offsets())
    comm = detect_communities(6, network_edges(cooccurrence_matrix(s, n), 0.05), 1.0, 2, seed=0)
    seg = community_map(6, comm.modules, bg_node=5)
    assert seg[0] == seg[1] == seg[2] != seg[3] and seg[3] == seg[4]
    shuffled = maps.copy()
    for m in shuffled:  # parts of both objects mixed in every image: no object structure left
        obj = m < 5
        m[obj] = rng.integers(0, 5, size=int(obj.sum()))
    s, n, _ = cooccurrence_stats(shuffled, 6, glcm_offsets())
    comm = detect_communities(6, network_edges(cooccurrence_matrix(s, n), 0.05), 1.0, 2, seed=0)
    seg = community_map(6, comm.modules, bg_node=5)
    assert not (seg[0] == seg[1] == seg[2] != seg[3] and seg[3] == seg[4])


# -- PCA, k-means, foreground mask, segmentation -------------------------------------------------------------------
def test_pca_from_shard_moments_equals_faiss_pcamatrix():
    import faiss

    from transfgu.leopart.pca import MomentStats, fit_pca, reduce_moments

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(600, 12)) @ rng.normal(size=(12, 12)) * rng.uniform(0.1, 5, 12) + 3).astype(np.float32)
    x[:, 5] = 2.0  # a constant feature: std 1, as StandardScaler
    pca = fit_pca(reduce_moments([MomentStats.of(p) for p in np.array_split(x, 3)]), 4)
    z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    ref = faiss.PCAMatrix(12, 4)
    ref.train(np.ascontiguousarray(z, dtype=np.float32))
    y_ref = ref.apply(np.ascontiguousarray(z, dtype=np.float32))
    y = pca.transform(x)
    np.testing.assert_allclose(np.abs(y), np.abs(y_ref), atol=2e-3 * np.abs(y_ref).max())
    with pytest.raises(ValueError, match="pca_dim"):
        fit_pca(MomentStats.of(x), 13)


@pytest.mark.parametrize("spherical", [False, True])
def test_lloyd_kmeans_over_shards_equals_faiss_from_the_same_init(spherical):
    import faiss

    from transfgu.kmeans import ArrayShards, gather, init_rows, l2_normalize, lloyd_kmeans

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(loc=c, size=(150, 8)) for c in rng.normal(scale=4, size=(6, 8))]).astype(np.float32)
    shards = ArrayShards(np.array_split(x, 4))
    fit = lloyd_kmeans(shards, 6, niter=15, seed=3, spherical=spherical, normalize=spherical)
    init = gather(shards, shards.counts(), init_rows(len(x), 6, 3))
    km = faiss.Kmeans(8, 6, niter=15, seed=3, spherical=spherical, max_points_per_centroid=10**7)
    xs = l2_normalize(x) if spherical else x
    km.train(xs, init_centroids=l2_normalize(init) if spherical else init)
    np.testing.assert_allclose(fit.centroids, km.centroids, atol=1e-4)
    assert all(a >= b - 1e-6 * abs(a) for a, b in zip(fit.objective, fit.objective[1:]))  # Lloyd never goes up
    with pytest.raises(ValueError, match="k=2000"):
        lloyd_kmeans(shards, 2000, niter=1)


def test_attention_mask_keeps_top_mass_and_drops_small_components():
    from transfgu.leopart.foreground import attention_mask, drop_small_components, top_mass_mask_np

    rng = np.random.default_rng(2)
    a = rng.random(100) ** 4
    m = top_mass_mask_np(a, 0.65)
    kept = a[m]
    assert kept.sum() / a.sum() >= 0.65 - 1e-9
    assert (kept.sum() - kept.min()) / a.sum() < 0.65  # minimal: dropping the smallest kept value falls short
    assert a[m].min() >= a[~m].max()  # the largest values
    blob = np.zeros((8, 8), bool)
    blob[0, 0:2] = True  # 2 patches: dropped
    blob[4:7, 4:7] = True  # 9 patches: kept
    out = drop_small_components(blob, 3)
    assert not out[0, :2].any() and out[4:7, 4:7].all()
    # whole pipeline on a peaked map: the peak region is foreground
    att = np.full((10, 10), 0.01)
    att[3:6, 3:6] = 1.0
    fg = attention_mask(att.ravel(), (10, 10)).reshape(10, 10)
    assert fg[3:6, 3:6].all() and not fg[0, 0]


def test_gaussian_blur_equals_torchvision():
    torch = pytest.importorskip("torch")
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from transfgu.leopart.foreground import gaussian_blur

    a = np.random.default_rng(0).random((9, 13)).astype(np.float32)
    ref = tvf.gaussian_blur(torch.from_numpy(a)[None, None], [7, 7], [0.6, 0.6])[0, 0].numpy()
    np.testing.assert_allclose(gaussian_blur(a, 7, 0.6), ref, atol=1e-6)


def test_upsample_labels_is_torch_nearest():
    torch = pytest.importorskip("torch")
    from transfgu.leopart.model import upsample_labels

    rng = np.random.default_rng(0)
    for h, w, hh, ww in [(8, 8, 32, 32), (28, 28, 100, 100), (14, 20, 375, 500), (7, 9, 3, 4), (100, 100, 28, 28)]:
        a = rng.integers(0, 50, (h, w))
        ref = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None].float(), size=(hh, ww),
                                              mode="nearest")[0, 0].long().numpy()
        np.testing.assert_array_equal(upsample_labels(a, (hh, ww)), ref)


def test_model_segmentation_matches_per_patch_brute_force():
    from transfgu.kmeans import l2_normalize
    from transfgu.leopart.model import LeopartModel
    from transfgu.leopart.pca import PCA

    rng = np.random.default_rng(3)
    p = 6
    pca = PCA(np.zeros(p), np.ones(p), np.eye(p), np.ones(p), 0)
    model = LeopartModel(pca, l2_normalize(rng.normal(size=(9, p))), rng.random(9) < 0.5,
                         rng.normal(size=(5, p)).astype(np.float32), rng.integers(0, 3, size=6))
    pts = rng.normal(size=(300, p)).astype(np.float32)
    seg = model.segments(pts)
    for x, s in zip(pts, seg):
        c = int(np.argmax(model.cbfe_centroids @ (x / np.linalg.norm(x))))
        node = int(np.argmin(((model.cd_centroids - x) ** 2).sum(1))) if model.foreground[c] else 5
        assert s == model.cluster_to_segment[node]


# -- the stages end to end on real images --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lp_run(tmp_path_factory):
    from transfgu.pipeline import run_pipeline

    cfg = leopart_config(tmp_path_factory.mktemp("leopart"), **{"mlflow.enabled": "true", "run.report": "true"})
    manifest = run_pipeline(cfg)
    return cfg, manifest


def _copy_run(cfg, tmp_path: Path, name: str, **over: str):
    shutil.copytree(cfg.run_dir, tmp_path / name)
    return leopart_config(tmp_path, name, **over)


def test_one_process_run_end_to_end(lp_run):
    from transfgu.leopart.pipeline import STAGES, read_segments

    cfg, manifest = lp_run
    assert [s for s in STAGES if manifest["stages"][s]["status"] == "done"] == list(STAGES)
    run = cfg.run_dir
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["method"] == "leopart" and metrics["labels_used_for_fitting"] is False
    assert metrics["pretrained"] is False and "warning" in metrics
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["n_images"] == 8
    assert set(metrics["overclustering"]) == {"5", "10"}
    assert len(metrics["mapping"]) == metrics["n_segments"]
    comm = json.loads((run / "communities" / "communities.json").read_text())
    assert comm["preferred_modules"] == 2 and comm["n_segments"] >= 1
    segs = read_segments(run, "val")
    assert len(segs) == 8 and all(s.shape == (8, 8) and s.max() < comm["n_segments"] for s in segs.values())
    # nothing pickled anywhere: the model is safetensors + JSON
    assert not [p for p in run.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]
    assert sorted(p.name for p in (run / "model").iterdir()) == ["backbone.safetensors", "leopart.safetensors",
                                                                  "model.json"]
    # real MLflow (SQLite under run.root): a parent run with one child per Leopart stage, the scores logged
    # (a client on the run's store: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for later tests)
    from mlflow import MlflowClient

    from transfgu.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(cfg))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=500)
    names = {r.data.tags.get("mlflow.runName") for r in runs}
    assert {f"stage {s}" for s in STAGES} <= names
    ev = next(r for r in runs if r.data.tags.get("mlflow.runName") == "stage evaluate")
    assert ev.data.metrics["mIoU"] == pytest.approx(metrics["mIoU"])
    # co-occurrence matrix rows are (averaged) distributions
    from safetensors.numpy import load_file

    m = load_file(str(run / "communities" / "communities.safetensors"))["cooccurrence"]
    assert m.shape == (9, 9) and np.all(m.sum(axis=1) <= 1 + 1e-9)
    from PIL import Image

    assert (run / "report" / "index.html").is_file()  # the HTML report (predictions, confusion, per-class IoU)

    with Image.open(run / "communities" / "graph.png") as im:  # the community graph picture
        assert im.size[0] > 100 and im.size[1] > 100


def test_rerun_skips_every_finished_stage(lp_run, tmp_path):
    from transfgu.pipeline import run_pipeline

    cfg, _ = lp_run
    cfg2 = _copy_run(cfg, tmp_path, "again")
    files = {p: p.stat().st_mtime_ns for p in cfg2.run_dir.rglob("*.parquet")}
    run_pipeline(cfg2)
    assert {p: p.stat().st_mtime_ns for p in cfg2.run_dir.rglob("*.parquet")} == files


def test_predict_with_saved_model_reproduces_stored_maps(lp_run, tmp_path):
    from transfgu.data.datasets import list_records
    from transfgu.data.io import load_rgb
    from transfgu.leopart.model import upsample_labels
    from transfgu.leopart.pipeline import read_segments
    from transfgu.predict import load, main

    cfg, _ = lp_run
    pred = load(cfg.run_dir, device="cpu")
    rec = list_records("weizmann_horse", cfg.data.root, "val")[0]
    img = load_rgb(rec.image_path)
    lab = pred.predict(img)
    assert lab.shape == img.shape[:2]
    stored = read_segments(cfg.run_dir, "val")[rec.image_id]
    np.testing.assert_array_equal(lab, upsample_labels(stored, img.shape[:2]))
    classes = pred.predict(img, as_classes=True)
    np.testing.assert_array_equal(classes, np.asarray(pred.cluster_to_class)[lab])
    out = tmp_path / "pred"
    assert main([str(cfg.run_dir), str(rec.image_path), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / f"{rec.image_path.stem}.png").is_file()


def test_paper_protocol_uses_train_labels_and_says_so(lp_run, tmp_path):
    from transfgu.pipeline import run_pipeline

    cfg, _ = lp_run
    cfg2 = _copy_run(cfg, tmp_path, "paper", **{"leopart.protocol": "paper", "leopart.unmatched": "background"})
    manifest = run_pipeline(cfg2)
    first = json.loads((cfg.run_dir / "_manifest.json").read_text())["stages"]
    # the dense features are kept; the PCA is refitted (the authors fit it on train + val)
    assert manifest["stages"]["dense"]["extra"]["seconds"] == first["dense"]["extra"]["seconds"]
    assert json.loads((cfg2.run_dir / "pca" / "pca.json").read_text())["n"] > json.loads(
        (cfg.run_dir / "pca" / "pca.json").read_text())["n"]
    info = json.loads((cfg2.run_dir / "cbfe" / "cbfe.json").read_text())
    assert info["labels_used"] is True and info["protocol"] == "paper"
    assert abs(info["threshold"] / 0.05 - round(info["threshold"] / 0.05)) < 1e-9
    assert len(info["cut_iou"]) == 3  # 12 clusters: cuts of 7, 8, 9 background clusters (55 %..75 %)
    metrics = json.loads((cfg2.run_dir / "eval" / "metrics.json").read_text())
    assert metrics["labels_used_for_fitting"] is True and metrics["unmatched"] == "background"


def test_unmatched_to_background_never_lowers_pixel_accuracy(lp_run, tmp_path):
    from transfgu.pipeline import run_pipeline

    cfg, _ = lp_run
    strict = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    cfg2 = _copy_run(cfg, tmp_path, "bg", **{"leopart.unmatched": "background"})
    manifest = run_pipeline(cfg2)
    assert manifest["stages"]["communities"]["extra"]["seconds"] == json.loads(
        (cfg.run_dir / "_manifest.json").read_text())["stages"]["communities"]["extra"]["seconds"]  # not redone
    loose = json.loads((cfg2.run_dir / "eval" / "metrics.json").read_text())
    assert loose["pixel_accuracy"] >= strict["pixel_accuracy"] - 1e-12
    assert all(c >= 0 for c in loose["mapping"])


def test_bad_inputs_are_recorded_or_rejected_clearly(tmp_path):
    from transfgu.config import ConfigError, load_config
    from transfgu.pipeline import run_pipeline

    horse = require_shared_data("weizmann_horse")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((horse / "images" / "train").glob("*.jpg"))[:6]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = leopart_config(tmp_path, "folder", **{
        "data.name": "folder", "data.root": str(folder), "data.val_split": "null", "data.train_split": "all",
        "run.error_budget": "0.2", "leopart.k_community": "4", "leopart.n_communities": "null",
    })
    manifest = run_pipeline(cfg)
    assert manifest["stages"]["dense"]["extra"]["errors"] == 1
    assert manifest["stages"]["evaluate"]["extra"]["skipped"] == "no labels"
    errors = [json.loads(line) for line in (cfg.run_dir / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["file"]).name for e in errors] == ["broken.jpg"]
    # too few foreground patches for the overclustering: a clear message naming the key
    bad = _copy_run(cfg, tmp_path, "toomany", **{
        "data.name": "folder", "data.root": str(folder), "data.val_split": "null", "data.train_split": "all",
        "run.error_budget": "0.2", "leopart.k_community": "100000", "leopart.n_communities": "null"})
    with pytest.raises(ValueError, match="leopart.k_community"):
        run_pipeline(bad)
    # (the paper protocol on a data set without a background class runs with a fixed CBFE threshold and unmatched
    # segments as errors: tests/ray/test_leopart_ray.py, the MSRC preset)
    with pytest.raises(ConfigError, match="blur_kernel"):
        load_config(REPO / "conf" / "leopart_horse.yaml", ["leopart.blur_kernel=4"])
    with pytest.raises(ConfigError, match="leopart.kcbfe"):
        load_config(REPO / "conf" / "leopart_horse.yaml", ["leopart.kcbfe=4"])
