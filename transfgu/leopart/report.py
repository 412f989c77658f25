"""The Leopart sections of a run's HTML report (:func:`transfgu.report.write_report` calls them for
``method: leopart``): foreground masks, cluster and community galleries, the community graph with the chosen
hyperparameters and the label-using evaluations.

Each reads only the run directory (dense/, pca/, cbfe/, communities/, segments/, eval/) and the data set's images;
a missing input gives a note, never an error (the report's rule).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from transfgu import viz
from transfgu.data.datasets import list_records
from transfgu.data.io import load_rgb, resize_image
from transfgu.layout import RunLayout
from transfgu.leopart import viz as lviz
from transfgu.leopart.dense import read_dense
from transfgu.leopart.foreground import attention_mask
from transfgu.leopart.pipeline import dense_files, load_model, mask_kwargs
from transfgu.report import Section, _table
from transfgu.store.formats import list_parquet_files


def _image_at(records: dict[str, Any], image_id: str, size: tuple[int, int]) -> np.ndarray | None:
    """The image as the dense stage saw it (resized bilinearly to ``leopart.input_size``), or None if unreadable."""

    try:
        return resize_image(np.array(load_rgb(records[image_id].image_path)), size, "bilinear")
    except (KeyError, OSError, ValueError):
        return None


def _to_image(values: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A per-patch array ``(h*w,)`` as an image-sized map: every patch covers its ``size / grid`` pixel block (the
    preflight makes ``leopart.input_size`` a multiple of the patch size)."""
    m = np.asarray(values).reshape(grid)
    return np.repeat(np.repeat(m, size[0] // grid[0], axis=0), size[1] // grid[1], axis=1)


def _records(cfg: Any, split: str) -> dict[str, Any]:

    return {r.image_id: r for r in list_records(cfg.data.name, cfg.data.root, split, **dict(cfg.data.options))}


def foreground_section(run_dir: Path, out: Path, cfg: Any, n_images: int) -> Any:
    """A few training images: CLS attention, the noisy attention mask, CBFE's foreground and the segments."""

    sec = Section("Leopart: foreground masks")
    if cfg is None:
        sec.note = "The run's config is missing, so the images cannot be found."
        return sec
    files = dense_files(run_dir, cfg.data.train_split) if RunLayout(run_dir).dense.is_dir() else []
    if not files or not RunLayout(run_dir).cbfe_arrays.is_file():
        sec.note = "No CBFE yet (dense/ or cbfe/ is missing): run the dense, pca and cbfe stages."
        return sec
    has_comm = RunLayout(run_dir).communities_arrays.is_file()
    model = load_model(run_dir, "communities" if has_comm else "cbfe")
    try:
        records = _records(cfg, cfg.data.train_split)
    except Exception as exc:
        sec.note = f"The training images are not readable here ({exc}); section skipped."
        return sec
    size = tuple(cfg.leopart.input_size)
    rows = []
    for im in read_dense(files[0])[:n_images]:
        img = _image_at(records, im.image_id, size)
        if img is None:
            continue
        pts = model.project(im.feats)
        grid = tuple(im.grid)
        attn = _to_image(im.attn, grid, size)
        mask = _to_image(attention_mask(im.attn, grid, **mask_kwargs(cfg)), grid, size)
        fg = _to_image(model.foreground_mask(pts), grid, size)
        seg = _to_image(model.segments(pts), grid, size) if has_comm else None
        rows.append((im.image_id, img, attn, mask, fg, seg))
    if not rows:
        sec.note = "None of the first training images is readable here."
        return sec
    fig = lviz.foreground_panel(rows, model.n_segments if has_comm else None)
    sec.images.append((viz.save_figure(fig, out / "leopart_foreground.png", dpi=80), ""))
    info = json.loads(RunLayout(run_dir).cbfe_json.read_text())
    lab = "chosen WITH THE TRAINING LABELS (protocol: paper)" if info.get("labels_used") else "fixed (no labels)"
    sec.html = (
        f"<p>The first {len(rows)} training images at the ViT's input size. The noisy mask keeps the patches holding "
        f"{100 * cfg.leopart.attn_mass:.0f} % of the blurred head-mean CLS attention; CBFE marks a patch foreground "
        f"when its cluster (of {info.get('k')}) has precision &ge; {info.get('threshold')} against those masks "
        f"({html.escape(lab)}); {info.get('n_foreground_clusters')} clusters are foreground. Segment 0 (first "
        "colour) is the background community.</p>"
    )
    return sec


def gallery_section(run_dir: Path, out: Path, cfg: Any, n_per_row: int, thumb: int, max_rows: int = 16) -> Any:
    """Per community, then per foreground cluster (the most frequent): crops of the training images where it
    covers the largest share of the patches, its patches bright and the rest dimmed."""
    import pyarrow.parquet as pq


    sec = Section("Leopart: community and cluster galleries")
    if cfg is None:
        sec.note = "The run's config is missing, so the images cannot be found."
        return sec
    seg_dir = RunLayout(run_dir).segments_split(cfg.data.train_split)
    files = list_parquet_files(seg_dir) if seg_dir.is_dir() else []
    if not files:
        sec.note = "No segments yet (segments/ is missing): run the segments stage."
        return sec
    segs: list[tuple[str, np.ndarray]] = []
    clus: list[tuple[str, np.ndarray]] = []
    for f in files[:4]:  # the first files are enough for a picture
        t = pq.read_table(f)
        for i, h, w, s, c in zip(*(t[k].to_pylist() for k in ("image_id", "h", "w", "segments", "clusters"))):
            segs.append((i, np.asarray(s, np.int64).reshape(h, w)))
            clus.append((i, np.asarray(c, np.int64).reshape(h, w)))
    try:
        records = _records(cfg, cfg.data.train_split)
    except Exception as exc:
        sec.note = f"The training images are not readable here ({exc}); galleries skipped."
        return sec
    comm = json.loads(RunLayout(run_dir).communities_json.read_text())
    k = int(comm["k"])
    from safetensors.numpy import load_file

    c2s = load_file(str(RunLayout(run_dir).communities_arrays))["cluster_to_segment"]
    size = tuple(cfg.leopart.input_size)
    cache: dict[str, np.ndarray | None] = {}

    def strip(maps: list[tuple[str, np.ndarray]], value: int) -> list[np.ndarray]:
        row = []
        for image_id, _ in lviz.top_images(maps, value, n_per_row):
            if image_id not in cache:
                cache[image_id] = _image_at(records, image_id, size)
            img = cache[image_id]
            if img is None:
                continue
            m = dict(maps)[image_id]
            y0, y1, x0, x1 = lviz.patch_box(m, value, img.shape[:2])
            on = _to_image(m == value, m.shape, img.shape[:2])[..., None]
            shown = np.where(on, img, (img * 0.3).astype(np.uint8))[y0:y1, x0:x1]
            s = thumb / max(shown.shape[:2])
            row.append(resize_image(shown, (max(1, round(shown.shape[0] * s)), max(1, round(shown.shape[1] * s)))))
        return row

    n_seg = int(c2s.max()) + 1
    seg_ids = list(range(n_seg))[:max_rows]
    seg_rows = [strip(segs, s) for s in seg_ids]
    seg_titles = [f"segment {s}" + (" (bg)" if s == 0 else "") + f"\n{int(np.sum(c2s == s))} clusters"
                  for s in seg_ids]
    fig = viz.concept_gallery(seg_rows, seg_titles, title="Communities: crops where each segment covers most")
    sec.images.append((viz.save_figure(fig, out / "leopart_communities.png", dpi=80),
                       f"Segments 0-{seg_ids[-1]} of {n_seg}."))
    counts = np.bincount(np.concatenate([m.ravel() for _, m in clus]), minlength=k + 1)[:k]
    top = [int(c) for c in np.argsort(-counts, kind="stable")[:max_rows] if counts[c] > 0]
    if top:
        fig = viz.concept_gallery([strip(clus, c) for c in top],
                                  [f"cluster {c}\n\u2192 segment {int(c2s[c])}" for c in top],
                                  title="Foreground clusters (most patches first): crops where each fires")
        sec.images.append((viz.save_figure(fig, out / "leopart_clusters.png", dpi=80),
                           f"The {len(top)} foreground clusters with the most patches of {k}."))
    sec.html = (
        f"<p>From {len(segs)} training images: each row shows up to {n_per_row} images where the segment "
        "(community) or foreground cluster covers the largest share of the patch grid, cropped to its patches, the "
        "other patches dimmed.</p>"
    )
    return sec


def graph_section(run_dir: Path, out: Path, metrics: dict[str, Any] | None) -> Any:
    """The community graph, the chosen hyperparameters (and whether labels chose them), and the evaluations that
    use labels (overclustering, linear probe)."""

    sec = Section("Leopart: community graph")
    src = RunLayout(run_dir).community_graph
    meta_path = RunLayout(run_dir).communities_json
    if not src.is_file() or not meta_path.is_file():
        sec.note = "No communities yet (communities/ is missing): run the communities stage."
        return sec
    comm = json.loads(meta_path.read_text())
    dst = out / "leopart_graph.png"
    shutil.copyfile(src, dst)
    sec.images.append((dst, "Clusters on a circle grouped by segment, edges = co-occurrence (width ~ weight)."))
    sel = comm.get("selection") or {}
    chosen = str(sel.get("selected_with", "fixed values (no labels)"))
    rows = [("k_community", comm.get("k")), ("Markov time", comm.get("markov_time")),
            ("edge threshold", comm.get("edge_threshold")), ("selected with", chosen),
            ("edges / Infomap modules / segments", f"{comm.get('n_edges')} / {comm.get('num_modules')} / "
                                                    f"{comm.get('n_segments')}"),
            ("codelength", f"{comm.get('codelength', float('nan')):.4f}")]
    if "train_mIoU" in sel:
        rows.append(("train mIoU of the chosen setting (labels)", f"{100 * sel['train_mIoU']:.2f} %"))
    parts = [_table(["setting", "value"], rows)]
    if chosen == "train labels":
        parts.insert(0, "<p><b>Hyperparameters selected with train labels</b> (protocol: paper): the grid below was "
                        "scored by Hungarian mIoU against the training split's ground truth.</p>")
        trials = [t for t in sel.get("trials", []) if "train_mIoU" in t]
        parts.append(_table(["k", "Markov time", "edge threshold", "segments", "train mIoU"],
                            [(t["k_community"], t["markov_time"], t["edge_threshold"], t["n_segments"],
                              f"{100 * t['train_mIoU']:.2f} %") for t in trials]))
    seeds = ((metrics or {}).get("infomap_seeds") or {}).get("mIoU") or {}
    if seeds.get("n", 0) > 1:  # the authors' evaluation: mean +- std over Infomap seeds, each seed listed
        per = ", ".join(f"{s}: {100 * v:.2f}" for s, v in seeds["per_seed"].items())
        parts.append(f"<p>Val mIoU over {seeds['n']} Infomap seeds (matching on "
                     f"{metrics.get('match', 'pixels')}, unmatched: {metrics.get('unmatched')}): "
                     f"<b>{100 * seeds['mean']:.2f} &plusmn; {100 * seeds['std']:.2f} %</b> (per seed, %: {per})</p>")
    label_rows = []
    for kk, v in ((metrics or {}).get("overclustering") or {}).items():
        label_rows.append((f"overclustering K={kk} (many-to-one with val labels)", f"{100 * v['mIoU']:.2f} %"))
    probe = (metrics or {}).get("linear_probe")
    if probe:
        label_rows.append((f"linear probe (trained with train labels, {probe['n_train_images']} images)",
                           f"{100 * probe['mIoU']:.2f} %"))
    if label_rows:
        parts.append("<p>Evaluations that <b>use labels</b> (feature quality, not unsupervised numbers):</p>"
                     + _table(["evaluation", "mIoU"], label_rows))
    sec.html = "".join(parts)
    return sec
