"""The stage-quality table of QUALITY.md: random backbone vs the supervised stand-in prior, every stage.

Runs the whole method (one process, no Ray) twice per data set on a small CPU-sized configuration -- the same one the
quality tests use -- and prints a Markdown table of the funnel: concept purity / NMI, pseudo-label mIoU / accuracy,
teacher and student val mIoU per round, final mIoU. The stand-in of each data set is trained on its *train* split
(``python -m transfgu.tools.standin_prior``); the val split is only ever evaluated.

    python -m transfgu.tools.quality_table --out-dir runs/quality \\
        camvid=../shared/data/camvid:tests/assets/standin_camvid.safetensors \\
        msrc_v2=../shared/data/msrc_v2:runs/standin_msrc.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfgu.config import load_config
from transfgu.layout import RunLayout
from transfgu.pipeline import run_pipeline

#: Classes per stand-in set (K = number of classes, one pool of all windows, as the CamVid demo).
N_CLASSES = {"camvid": 11, "msrc_v2": 21, "weizmann_horse": 2}


def quality_overrides(dataset: str, root: str | Path, run_root: str | Path, name: str, weights: str,
                      **over: str) -> dict[str, str]:
    """Dotted config overrides of the small quality configuration (``vit_standin`` backbone, 16 train images)."""
    k = N_CLASSES.get(dataset, 11)
    base = {
        "data.name": dataset,
        "data.root": str(root),
        "data.max_train_images": "16",
        "data.max_val_images": "12",
        "backbone.arch": "vit_standin",
        "backbone.weights": weights,
        "crops.input_size": "[192, 256]",
        "crops.betas": "[0.5, 0.3]",
        "crops.selection": "all",
        "crops.crop_size": "48",
        "concepts.k_per_pool": f"{{all: {k}}}",
        "concepts.niter": "30",
        "pseudo.input_size": "[96, 128]",
        "pseudo.grad_scale": "0.5",
        "train.train_size": "[96, 128]",
        "train.batch_size": "8",
        "train.repeat": "8",
        "train.epochs": "8",
        "train.lr": "0.0005",
        "train.teacher_intervals": "[4]",
        "train.bootstrap_start": "4",
        "eval.eval_size": "[96, 128]",
        "eval.batch_size": "12",
        "run.root": str(run_root),
        "run.name": name,
        "mlflow.enabled": "true",
        "run.report": "true",
    }
    base.update(over)
    return base


def quality_config(dataset: str, root: str | Path, run_root: str | Path, name: str, weights: str, **over: str):
    ov = quality_overrides(dataset, root, run_root, name, weights, **over)
    return load_config(None, [f"{k}={v}" for k, v in ov.items()])


def stage_numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The funnel of one run's ``eval/metrics.json`` as flat numbers."""
    st = metrics.get("stages") or {}
    c, p, rounds = st.get("concepts") or {}, st.get("pseudo_labels") or {}, st.get("rounds") or []
    out: dict[str, float | None] = {
        "concept_purity": c.get("purity"),
        "concept_balanced_purity": c.get("balanced_purity"),
        "concept_nmi": c.get("nmi"),
        "pseudo_mIoU": p.get("mIoU"),
        "pseudo_acc": p.get("pixel_accuracy"),
        "pseudo_anchored_mIoU": p.get("anchored_mIoU"),
    }
    for r in rounds if isinstance(rounds, list) else []:
        out[f"round{r['round']}_teacher_mIoU"] = r.get("teacher_mIoU")
        out[f"round{r['round']}_student_mIoU"] = r.get("student_mIoU")
    for t in st.get("targets") or [] if isinstance(st.get("targets"), list) else []:
        out[f"round{t['round']}_targets_mIoU"] = t.get("mIoU")
        out[f"round{t['round']}_targets_anchored_mIoU"] = t.get("anchored_mIoU")
        out[f"round{t['round']}_student_teacher_agreement"] = t.get("student_teacher_agreement")
        out[f"round{t['round']}_pseudo_teacher_agreement"] = t.get("pseudo_teacher_agreement")
    out["final_mIoU"] = metrics.get("mIoU")
    out["final_acc"] = metrics.get("pixel_accuracy")
    return out


def markdown(results: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """One table: a row per stage measure, a column pair (random, stand-in) per data set."""
    sets = list(results)
    keys: list[str] = []
    for per_prior in results.values():
        for nums in per_prior.values():
            keys += [k for k in nums if k not in keys]
    head = "| stage | " + " | ".join(f"{s} random | {s} stand-in" for s in sets) + " |"
    sep = "|---|" + "---|---|" * len(sets)
    lines = [head, sep]
    for k in keys:
        cells = []
        for s in sets:
            for prior in ("random", "standin"):
                v = results[s].get(prior, {}).get(k)
                cells.append("n/a" if v is None else (f"{v:.3f}" if "nmi" in k else f"{100 * v:.1f} %"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfgu.tools.quality_table", description=__doc__.split("\n")[0])
    p.add_argument("sets", nargs="+", metavar="NAME=ROOT:STANDIN", help="data set name, its root, its stand-in file")
    p.add_argument("--out-dir", default="runs/quality")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out_dir)
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for item in a.sets:
        name, _, rest = item.partition("=")
        root, _, standin = rest.rpartition(":")
        results[name] = {}
        for prior, weights in (("random", "none"), ("standin", standin)):
            cfg = quality_config(name, root, out, f"{name}_{prior}", weights)
            t0 = time.time()
            run_pipeline(cfg)
            m = json.loads(RunLayout(cfg.run_dir).metrics.read_text())
            results[name][prior] = stage_numbers(m)
            print(f"{name} {prior}: {time.time() - t0:.0f}s {results[name][prior]}", flush=True)
    (out / "quality_table.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
