"""Leopart's unsupervised segmentation (Ziegler & Asano, CVPR 2022) as a method: six stages (docs/leopart.md).

The stage functions are :mod:`transfgu.leopart.pipeline`'s, each ``run(ctx, ex)`` for either executor; this module
declares their outputs and hash inputs, the preflight checks and the report sections.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transfgu.config import Config, LeopartMethodConfig
from transfgu.integrity import Output
from transfgu.leopart import pipeline as lp
from transfgu.leopart import report as lrep
from transfgu.method import Method, Stage
from transfgu.preflight import size_problems


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d["leopart"][k] for k in keys}


def _paper(d: dict[str, Any]) -> bool:
    return d["leopart"]["protocol"] == "paper"


def _changed(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The protocol choices whose value is not the label-free one (earlier label-free runs keep their hashes)."""
    return {k: d["leopart"][k] for k in keys if d["leopart"][k] != lp.LABEL_FREE.get(k)}


def _dense_inputs(d: dict[str, Any]) -> dict[str, Any]:
    return {"method": "leopart", "data": d["data"], "backbone": d["backbone"], **_pick(d, "input_size"),
            "seed": d["run"]["seed"], **_changed(d, "cbfe_attention", "cbfe_attention_arch", "cbfe_attention_weights")}


def _kmeans_keys(d: dict[str, Any]) -> list[str]:
    """The k-means settings away from their defaults: only then do they enter a hash (earlier runs keep theirs)."""
    defaults = (("kmeans_points", "l2_normalized"), ("kmeans_max_points_per_centroid", None))
    return [k for k, v in defaults if d["leopart"][k] != v]


def _cbfe_inputs(d: dict[str, Any]) -> dict[str, Any]:
    keys = ["protocol", "attn_mass", "blur_kernel", "blur_sigma", "min_component", "k_cbfe", "cbfe_niter",
            "cbfe_nredo", "precision_threshold", "seed", *_kmeans_keys(d)] + (["eval_size"] if _paper(d) else [])
    return {**_pick(d, *keys), **_changed(d, "val_precision")}


def _communities_inputs(d: dict[str, Any]) -> dict[str, Any]:
    keys = ["k_community", "community_niter", "cooc_size", "edge_threshold", "markov_time", "n_communities",
            "infomap_trials", "seed"] + [k for k in _kmeans_keys(d) if k != "kmeans_points"]
    if d["leopart"]["community_nredo"] != 1:
        keys.append("community_nredo")
    if _paper(d):  # the grid search scores on the training labels
        keys += ["paper_grid", "eval_size", "unmatched"]
    return {**_pick(d, *keys), **_changed(d, "cooc_angles", "cooc_presence", "match", "infomap_runs")}


def _evaluate_inputs(d: dict[str, Any]) -> dict[str, Any]:
    keys = ["eval_size", "overcluster_k", "unmatched", "cbfe_niter", "seed", *_kmeans_keys(d)]
    if d["leopart"]["linear_probe"]["enabled"]:  # only then: a run without the probe keeps its earlier hash
        keys.append("linear_probe")
    return {**_pick(d, *keys),
            **_changed(d, "match", "overcluster_split", "overcluster_seeds", "overcluster_spherical")}


def check_sizes(cfg: Config, p: int) -> list[tuple[str, str]]:
    """Leopart reads only its own input size."""
    return size_problems("leopart.input_size", cfg.leopart.input_size, p, cfg.backbone.arch)


def memory_passes(cfg: Config) -> list[tuple[str, str, tuple[int, int], int, int]]:
    return [("leopart.input_size", "leopart.batch_size", tuple(cfg.leopart.input_size), cfg.leopart.batch_size, 1)]


def summary(cfg: Config) -> str:
    return f"method <b>leopart</b> (CBFE + community detection), protocol {html.escape(cfg.leopart.protocol)}"


def report_sections(builders: list[tuple[str, Callable[[], Any]]], run_dir: Path, out: Path, cfg: Config | None,
                    metrics: dict[str, Any] | None, opt: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Leopart's own pictures instead of TransFGU's concept galleries, CAM panels and validation history."""
    if cfg is None:
        return builders
    mine: list[tuple[str, Callable[[], Any]]] = [
        ("Leopart: foreground masks", lambda: lrep.foreground_section(run_dir, out, cfg, opt.n_mask_images)),
        ("Leopart: community and cluster galleries",
         lambda: lrep.gallery_section(run_dir, out, cfg, opt.n_per_concept, opt.thumb)),
        ("Leopart: community graph", lambda: lrep.graph_section(run_dir, out, metrics)),
    ]
    return [*builders[:3], *mine, *builders[6:]]


METHOD = Method(
    name="leopart",
    config=LeopartMethodConfig,
    title="Leopart",
    stages=(
        Stage("dense", lp.run_dense, outputs=(Output("dense", "shards"),),
              inputs=_dense_inputs),
        Stage("pca", lp.run_pca, outputs=(Output("pca", stamp="pca.json"),),
              inputs=lambda d: {**_pick(d, "pca_dim"), **_changed(d, "fit_splits")}),
        Stage("cbfe", lp.run_cbfe, outputs=(Output("cbfe", stamp="cbfe.json"),), inputs=_cbfe_inputs),
        Stage("communities", lp.run_communities,
              outputs=(Output("communities", stamp="communities.json"), Output("model", stamp="model.json")),
              inputs=_communities_inputs),
        Stage("segments", lp.run_segments, outputs=(Output("segments", stamp="segments.json"),),
              inputs=lambda d: {}),
        Stage("evaluate", lp.run_evaluate, outputs=(Output("eval", stamp="metrics.json"),), inputs=_evaluate_inputs),
    ),
    check_sizes=check_sizes,
    memory_passes=memory_passes,
    summary=summary,
    report_sections=report_sections,
)
