"""TransFGU (Yin et al., ECCV 2022) as a method: five stages (docs/architecture.md, "Stages").

The stage definitions are :mod:`transfgu.stages` (per-item work, outputs, checks); the one-process pieces are in
:mod:`transfgu.local` and the Ray ones in :mod:`transfgu.distributed` (k-means as Ray tasks, one Ray Train fit per
bootstrapping round, evaluation as a Ray task).
"""

from __future__ import annotations

import html
from typing import Any

from transfgu import local, stages
from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.crops import window_layout
from transfgu.data.datasets import SUBSET_OPTIONS
from transfgu.distributed import evaluate_stage as ray_evaluate
from transfgu.distributed import kmeans as ray_kmeans
from transfgu.distributed import train as ray_train
from transfgu.integrity import Output
from transfgu.method import Executor, Method, Stage, StageInfo
from transfgu.preflight import size_problems

#: ``train`` fields that only say how the training input is read; left out of the train hash.
TRAIN_INPUT_ONLY = ("num_workers", "image_store")


def _data(d: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in d["data"].items() if k != "max_val_images"}
    # Training/evaluation subsets (curated lists) do not change the crop, concept and label-bank stages.
    data["options"] = {k: v for k, v in data["options"].items() if k not in SUBSET_OPTIONS}
    return data


def _train_inputs(d: dict[str, Any]) -> dict[str, Any]:
    subsets = {k: v for k, v in d["data"]["options"].items() if k in SUBSET_OPTIONS}
    # How the training input is read (loader processes, the image store) does not change what training computes.
    train = {k: v for k, v in d["train"].items() if k not in TRAIN_INPUT_ONLY}
    return {"train": train, "seed": d["run"]["seed"], **({"subsets": subsets} if subsets else {})}


def _run_extract(ctx: RunContext, ex: Executor) -> StageInfo:
    return ex.run_sharded(ctx, stages.ExtractStage)


def _run_label_bank(ctx: RunContext, ex: Executor) -> StageInfo:
    return ex.run_sharded(ctx, stages.LabelBankStage)


def _summary(cfg: Config) -> str:
    return (f"K = {cfg.concepts.k} concepts {html.escape(str(dict(cfg.concepts.k_per_pool)))}, "
            f"variant {html.escape(cfg.train.variant)}")


def memory_passes(cfg: Config) -> list[tuple[str, str, tuple[int, int], int, int]]:
    """The backbone passes of extract (whole image, crops), pseudo labels, training and evaluation."""
    k = cfg.concepts.k + 1
    return [
        ("crops.input_size", "crops.batch_size", tuple(cfg.crops.input_size), 1, 1),
        ("crops.crop_size", "crops.batch_size", (cfg.crops.crop_size,) * 2, cfg.crops.batch_size, 1),
        ("pseudo.input_size", "pseudo.batch_size", tuple(cfg.pseudo.input_size), cfg.pseudo.batch_size, k),
        # training crops are half the train size; the decoder's K maps stay at patch resolution
        ("train.train_size", "train.batch_size", (cfg.train.train_size[0] // 2, cfg.train.train_size[1] // 2),
         cfg.train.batch_size, 1),
        ("eval.eval_size", "eval.batch_size", tuple(cfg.eval.eval_size), cfg.eval.batch_size, k),
    ]


def check_sizes(cfg: Config, p: int) -> list[tuple[str, str]]:
    """The crop, pseudo-label and training sizes against the patch size ``p``, and the sliding-window layout."""
    arch = cfg.backbone.arch
    problems = size_problems("crops.input_size", cfg.crops.input_size, p, arch)
    problems += size_problems("pseudo.input_size", cfg.pseudo.input_size, p, arch)
    if cfg.crops.crop_size % p:
        problems.append(("crops.crop_size", f"{cfg.crops.crop_size} is not a multiple of the patch size {p}; use "
                                            f"e.g. {max(p, round(cfg.crops.crop_size / p) * p)}"))
    size = cfg.train.train_size
    if size[0] % (2 * p) or size[1] % (2 * p):  # training crops are half the train size, in whole patches
        problems.append(("train.train_size", f"{list(size)}: each side must be a multiple of 2 x patch size = "
                                             f"{2 * p} (training crops are half that size); use e.g. "
                                             f"{[max(2 * p, round(s / (2 * p)) * 2 * p) for s in size]}"))
    h, w = cfg.crops.input_size
    if not (h % p or w % p):
        try:
            window_layout(h // p, w // p, cfg.crops.betas)
        except ValueError as exc:
            problems.append(("crops.betas", f"{cfg.crops.betas} with crops.input_size={list(cfg.crops.input_size)} "
                                            f"(a {h // p}x{w // p} patch grid): {exc}"))
    return problems


def check_concepts_fit(cfg: Config, n_train: int, p: int) -> list[tuple[str, str]]:
    """K per pool against the most crops the extract stage can produce (images x sliding windows), before any work.

    The fg/bg split of the crops is only known after extraction; this bound is exact for ``crops.selection=all`` and
    an upper bound otherwise, so it refuses only what can never work (k-means would fail after the whole extract).
    """
    if n_train <= 0:
        return []
    n = min(n_train, cfg.data.max_train_images or n_train)
    h, w = cfg.crops.input_size
    windows = len(window_layout(h // p, w // p, cfg.crops.betas))
    most = n * windows
    return [(f"concepts.k_per_pool.{pool}", f"k={k} concepts but the extract stage can give at most {most} crops "
                                            f"({n} images x {windows} windows): lower k or use more images")
            for pool, k in cfg.concepts.k_per_pool.items() if int(k) > most]


METHOD = Method(
    name="transfgu",
    stages=(
        Stage("extract", _run_extract, outputs=(Output("features", "shards"),),
              inputs=lambda d: {"data": _data(d), "backbone": d["backbone"], "crops": d["crops"],
                                "seed": d["run"]["seed"]}),
        Stage("concepts", lambda ctx, ex: local.run_concepts(ctx),
              on={"ray": lambda ctx, ex: ray_kmeans.run_concepts_ray(ctx)},
              outputs=(Output("concepts", stamp="concepts.json"),), inputs=lambda d: {"concepts": d["concepts"]}),
        Stage("label_bank", _run_label_bank, outputs=(Output("label_bank", "shards"),),
              inputs=lambda d: {"pseudo": d["pseudo"]}),
        Stage("train", lambda ctx, ex: local.run_train(ctx), on={"ray": lambda ctx, ex: ray_train.run_train_ray(ctx)},
              outputs=(Output("train", "rounds"), Output("model", stamp="model.json")), inputs=_train_inputs,
              epochs=True),
        Stage("evaluate", lambda ctx, ex: stages.evaluate_model(ctx),
              on={"ray": lambda ctx, ex: ray_evaluate.run_evaluate_ray(ctx)},
              outputs=(Output("eval", stamp="metrics.json"),),
              inputs=lambda d: {"eval": d["eval"], "val": d["data"]["val_split"], "n": d["data"]["max_val_images"]}),
    ),
    check_sizes=check_sizes,
    memory_passes=memory_passes,
    check_fit=check_concepts_fit,
    summary=_summary,
    mlflow_model=True,
)
