"""Stage quality before and after Leopart's dense fine-tuning (docs/leopart.md, "Dense fine-tuning").

Fine-tunes a backbone with a ``method: leopart_finetune`` preset, then runs the small quality configuration of
:mod:`transfgu.tools.quality_table` (the TransFGU stages: concept purity / NMI, pseudo-label mIoU, val mIoU per round
and final) once with the preset's source weights ("before") and once with the fine-tuned backbone ("after").
With ``--leopart`` it also runs Leopart's CBFE + CD on the same data set with each backbone
(:func:`leopart_overrides`: label-free mIoU and the overclustering mIoU, Leopart's own feature measure).
One process, no Ray; seeded, so the numbers repeat.

    python -m transfgu.tools.finetune_quality --config conf/leopart_finetune_camvid.yaml \\
        --out-dir runs/finetune_quality data.root=../shared/data/camvid
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfgu.config import LeopartFinetuneMethodConfig, load_config
from transfgu.layout import RunLayout
from transfgu.leopart.finetune_stage import backbone_from_state, latest_state
from transfgu.methods import stage_hashes
from transfgu.pipeline import run_pipeline
from transfgu.store.atomic import fix_mode
from transfgu.tools.quality_table import quality_config, stage_numbers


def leopart_overrides(root: str | Path, run_root: str | Path, name: str, weights: str) -> dict[str, str]:
    """A small CBFE + CD run on CamVid-sized street scenes with the ``vit_standin`` backbone (64 train, 24 val)."""
    return {
        "method": "leopart", "data.name": "camvid", "data.root": str(root), "data.max_train_images": "64",
        "data.max_val_images": "24", "backbone.arch": "vit_standin", "backbone.weights": weights,
        "leopart.input_size": "[96, 128]", "leopart.batch_size": "16", "leopart.pca_dim": "32",
        "leopart.k_cbfe": "40", "leopart.cbfe_niter": "30", "leopart.cbfe_nredo": "2", "leopart.k_community": "30",
        "leopart.community_niter": "30", "leopart.cooc_size": "[48, 64]", "leopart.edge_threshold": "0.02",
        "leopart.overcluster_k": "[11, 50]", "leopart.eval_size": "[96, 128]", "run.root": str(run_root),
        "run.name": name, "mlflow.enabled": "false", "run.report": "false",
    }


def leopart_numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"leopart_mIoU": metrics.get("mIoU"), "leopart_acc": metrics.get("pixel_accuracy")}
    for k, v in (metrics.get("overclustering") or {}).items():
        out[f"leopart_overcluster{k}_mIoU"] = v.get("mIoU")
    return out


def table(results: dict[str, dict[str, float | None]]) -> str:
    """Markdown: a row per stage measure, one column per backbone."""
    cols = list(results)
    keys: list[str] = []
    for nums in results.values():
        keys += [k for k in nums if k not in keys]
    lines = ["| stage | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        cells = []
        for c in cols:
            v = results[c].get(k)
            cells.append("n/a" if v is None else (f"{v:.3f}" if "nmi" in k else f"{100 * v:.1f} %"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfgu.tools.finetune_quality", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a method: leopart_finetune preset")
    p.add_argument("--out-dir", default="runs/finetune_quality")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--leopart", action="store_true", help="also score Leopart's CBFE + CD with each backbone")
    p.add_argument("--student", action="store_true",
                   help="also score the last epoch's student backbone (short runs: the EMA teacher barely moves)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the fine-tuning preset")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out_dir)
    cfg = load_config(a.config, [*a.overrides, f"run.root={out}"])
    if not isinstance(cfg, LeopartFinetuneMethodConfig):  # the tool reads the fine-tuning's own outputs
        raise SystemExit(f"{a.config} is not a method: leopart_finetune preset")
    t0 = time.time()
    run_pipeline(cfg)
    ft_info = json.loads(RunLayout(cfg.run_dir).finetune_json.read_text())
    timing: dict[str, Any] = {"finetune_s": round(time.time() - t0, 1)}
    print(f"finetune: {timing['finetune_s']}s losses {[h['loss'] for h in ft_info['history']]}", flush=True)
    backbones = {"before": cfg.backbone.weights, "after": str(RunLayout(cfg.run_dir).finetune_backbone)}
    if a.student:  # the student of the last epoch (the exported backbone is finetune.export's choice)
        from safetensors import safe_open
        from safetensors.torch import save_file

        state = latest_state(RunLayout(cfg.run_dir).finetune, stage_hashes(cfg)["finetune"])
        if state is None:
            raise SystemExit("no epoch state of this fine-tuning run to take the student from")
        with safe_open(backbones["after"], framework="pt") as fh:
            meta = fh.metadata() or {}
        path = out / f"{cfg.data.name}_student_backbone.safetensors"
        save_file({k: v.contiguous() for k, v in backbone_from_state(state, "student").items()}, str(path), meta)
        fix_mode(path)  # safetensors writes 0600; the umask decides
        backbones["after (student)"] = str(path)
    results: dict[str, dict[str, float | None]] = {}
    for label, weights in backbones.items():
        tag = re.sub(r"\W+", "_", label).strip("_")  # "after (student)" -> after_student
        qc = quality_config(cfg.data.name, cfg.data.root, out, f"{cfg.data.name}_{tag}", weights,
                            **{"mlflow.enabled": "false", "run.report": "false"})
        t0 = time.time()
        run_pipeline(qc)
        m = json.loads(RunLayout(qc.run_dir).metrics.read_text())
        results[label] = stage_numbers(m)
        timing[f"{label}_s"] = round(time.time() - t0, 1)
        print(f"{label} ({weights}): {timing[f'{label}_s']}s {results[label]}", flush=True)
        if a.leopart:
            lc = load_config(None, [f"{k}={v}" for k, v in
                                    leopart_overrides(cfg.data.root, out, f"leopart_{tag}", weights).items()])
            t0 = time.time()
            run_pipeline(lc)
            results[label].update(leopart_numbers(json.loads(RunLayout(lc.run_dir).metrics.read_text())))
            timing[f"leopart_{label}_s"] = round(time.time() - t0, 1)
            print(f"leopart {label}: {timing[f'leopart_{label}_s']}s", flush=True)
    (out / "finetune_quality.json").write_text(json.dumps(
        {"results": results, "finetune": ft_info, "backbones": backbones, "seconds": timing}, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
