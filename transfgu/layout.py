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
      label_bank/_train_input/      train: the training-input caches built from the bank (data/train_store.py)
      train/round_<r>/              train: training state of bootstrapping round r (checkpoint.py)
      model/                        train: decoder + model.json (+ a random backbone) for `transfgu predict`
      eval/                         evaluate: metrics.json, per_class_iou.csv, confusion.csv
      report/                       report: index.html
    Leopart (method: leopart) and its dense fine-tuning (method: leopart_finetune):
      dense/<split>/part-*.parquet  dense: patch features of each split
      pca/                          pca: pca.json (+ arrays)
      cbfe/                         cbfe: cbfe.safetensors + cbfe.json
      communities/                  communities: communities.safetensors + communities.json, graph.png
      segments/<split>/, segments/segments.json   segments: per-image segment maps
      finetune/                     finetune: backbone.safetensors, finetune.json, before_after.png
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
#: The training-input caches inside ``label_bank/`` (the leading ``_`` keeps every bank reader away from them).
TRAIN_INPUT_DIR = "_train_input"
#: One JSON line per validated epoch (train.select=best_val / train.validate_every; transfgu.selection).
VAL_HISTORY = "val_history.jsonl"


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

    # files inside the stage outputs
    @property
    def train_input(self) -> Path:
        return self.label_bank / TRAIN_INPUT_DIR

    @property
    def model_json(self) -> Path:
        return self.model / "model.json"

    @property
    def model_card(self) -> Path:
        return self.model / "MODEL_CARD.md"

    @property
    def val_history(self) -> Path:
        return self.train / VAL_HISTORY

    @property
    def report_index(self) -> Path:
        return self.report / "index.html"

    @property
    def confusion_png(self) -> Path:
        return self.report / "confusion.png"

    @property
    def cache_done(self) -> Path:
        """The record of a finished stage in a shared Tune cache entry (transfgu.distributed.tune)."""
        return self.root / "_done.json"

    # Leopart's stage outputs
    @property
    def dense(self) -> Path:
        return self.root / "dense"

    def dense_split(self, split: str) -> Path:
        return self.dense / split

    @property
    def pca(self) -> Path:
        return self.root / "pca"

    @property
    def pca_json(self) -> Path:
        return self.pca / "pca.json"

    @property
    def cbfe(self) -> Path:
        return self.root / "cbfe"

    @property
    def cbfe_arrays(self) -> Path:
        return self.cbfe / "cbfe.safetensors"

    @property
    def cbfe_json(self) -> Path:
        return self.cbfe / "cbfe.json"

    @property
    def communities(self) -> Path:
        return self.root / "communities"

    @property
    def communities_arrays(self) -> Path:
        return self.communities / "communities.safetensors"

    @property
    def communities_json(self) -> Path:
        return self.communities / "communities.json"

    @property
    def community_graph(self) -> Path:
        return self.communities / "graph.png"

    @property
    def segments(self) -> Path:
        return self.root / "segments"

    def segments_split(self, split: str) -> Path:
        return self.segments / split

    @property
    def segments_json(self) -> Path:
        return self.segments / "segments.json"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def finetune_json(self) -> Path:
        return self.finetune / "finetune.json"

    @property
    def finetune_backbone(self) -> Path:
        return self.finetune / "backbone.safetensors"

    @property
    def finetune_pictures(self) -> Path:
        return self.finetune / "before_after.png"

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
