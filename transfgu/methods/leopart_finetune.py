"""Leopart's dense fine-tuning as a method: one stage, ``finetune`` (docs/leopart.md, "Dense fine-tuning").

One process runs :func:`transfgu.leopart.finetune_stage.run_finetune`; Ray runs the same loop in a Ray Train
``TorchTrainer`` (:func:`transfgu.distributed.finetune_stage.run_finetune_ray`). Its output
``<run>/finetune/backbone.safetensors`` is a ``backbone.weights=`` file for the other methods. The stage resumes
from its own checkpoints (stamped with its hash), so it declares no output for the pipeline to set aside.
"""

from __future__ import annotations

from typing import Any

from transfgu.config import Config
from transfgu.distributed import finetune_stage as ray_finetune
from transfgu.leopart import finetune_stage as ftt
from transfgu.method import Method, Stage


def _inputs(d: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in d["data"].items() if k != "max_val_images"}
    return {"method": "leopart_finetune", "data": data, "backbone": d["backbone"], "finetune": d["finetune"],
            "seed": d["run"]["seed"]}


def check_sizes(cfg: Config, p: int) -> list[tuple[str, str]]:
    """The fine-tuning crops only."""
    out = []
    for key in ("global_size", "local_size"):
        v = getattr(cfg.finetune, key)
        if v % p:
            out.append((f"finetune.{key}", f"{v} is not a multiple of the backbone's patch size {p} "
                                           f"({cfg.backbone.arch}); use e.g. {max(p, round(v / p) * p)}"))
    return out


def memory_passes(cfg: Config) -> list[tuple[str, str, tuple[int, int], int, int]]:
    f = cfg.finetune
    return [("finetune.global_size", "finetune.batch_size", (f.global_size, f.global_size), f.batch_size * f.n_global,
             1)]


METHOD = Method(
    name="leopart_finetune",
    stages=(
        Stage("finetune", lambda ctx, ex: ftt.run_finetune(ctx),
              on={"ray": lambda ctx, ex: ray_finetune.run_finetune_ray(ctx)}, inputs=_inputs, epochs=True),
    ),
    check_sizes=check_sizes,
    memory_passes=memory_passes,
)
