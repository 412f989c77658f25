"""Every path of a run directory, in one place (docs/architecture.md, "Run directory").

A run directory holds one run of the method; each stage writes only its own entry::

    <run.root>/<run.name>/
      config.yaml            resolved config (the pipeline)
      _manifest.json         per-stage status and input hash (store.Manifest)
      errors.jsonl           inputs that could not be used (errors.ErrorLog)
      pipeline.log           the driver's log
      backbone_random.safetensors   a random backbone's weights (weights=none), saved once
      features/part-*.parquet       extract: crop boxes + CLS features
      concepts/                     concepts: centroids.npy + concepts.json
      label_bank/part-*.parquet     label_bank: per-image concept maps
      train/round_<r>/              train: training state of bootstrapping round r (checkpoint.py)
      model/                        train: decoder + model.json (+ a random backbone) for `transfgu predict`
      eval/                         evaluate: metrics.json, per_class_iou.csv, confusion.csv
      report/                       report: index.html
      ray_results/                  Ray Train's own checkpoints (Ray executor, unless ray.storage_path is set)
      _stale/<stage>/<hash12>/      outputs of other inputs, moved aside and never read (transfgu.integrity)
      _stale/_set_aside.jsonl       what was moved there: the only entries `transfgu clean` deletes
      _lock.json                    held (flock) while a run uses the directory; its host and pid (transfgu.runlock)

Nothing else builds these names: stages, executors, the report and the Tune cache ask a :class:`RunLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Stage -> its output entry in the run directory (the Tune cache shares these between trials).
STAGE_OUTPUTS = {"extract": "features", "concepts": "concepts", "label_bank": "label_bank", "train": "train",
                 "evaluate": "eval"}


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created by building one)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # files of the whole run
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "_manifest.json"

    @property
    def errors(self) -> Path:
        return self.root / "errors.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "pipeline.log"

    @property
    def random_backbone(self) -> Path:
        return self.root / "backbone_random.safetensors"

    # stage outputs
    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def concepts(self) -> Path:
        return self.root / "concepts"

    @property
    def label_bank(self) -> Path:
        return self.root / "label_bank"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    def stale(self, stage: str, tag: str) -> Path:
        """Where outputs of ``stage`` computed from other inputs are moved: ``_stale/<stage>/<tag>``."""
        return self.root / "_stale" / stage / tag

    def output(self, stage: str) -> Path:
        """The output entry of ``stage`` (see :data:`STAGE_OUTPUTS`)."""
        return self.root / STAGE_OUTPUTS[stage]

    def round_dir(self, round_idx: int) -> Path:
        """Training state of bootstrapping round ``round_idx``: ``train/round_<rrr>``."""
        return self.train / round_name(round_idx)


def round_name(round_idx: int) -> str:
    return f"round_{int(round_idx):03d}"


def shard_file(out_dir: Path, shard: int, first: int | None = None) -> Path:
    """``part-<shard>.parquet`` for a whole shard, ``part-<shard>-<first image>.parquet`` for a piece of one."""
    if first is None:
        return Path(out_dir) / f"part-{int(shard):05d}.parquet"
    return Path(out_dir) / f"part-{int(shard):05d}-{int(first):07d}.parquet"
