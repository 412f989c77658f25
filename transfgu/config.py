"""Run configuration: pydantic v2 models (``extra="forbid"``), YAML presets in ``conf/`` and dotted overrides.

Every entry point builds a :class:`Config` with :func:`load_config` before any work starts, so a typo or a bad value
fails at once with a message that names the key. Defaults are the paper's COCO-Stuff-27 settings
(the authors' per-data-set settings) where one exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from transfgu.models.source import BackboneSource, parse_source
from transfgu.paths import check_name
from transfgu.store.atomic import atomic_write_text


class _Base(BaseModel):
    # allow_inf_nan=False: `train.lr=.inf` (or nan) is refused with the key named, like any out-of-range value
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_size(v: tuple[int, int]) -> tuple[int, int]:
    if v[0] < 8 or v[1] < 8:
        raise ValueError(f"image size {v} is too small (each side must be >= 8 pixels)")
    return v


class DataConfig(_Base):
    """Which images to read (see :mod:`transfgu.data`)."""

    name: str = "camvid"
    root: Path = Path("../shared/data/camvid")
    train_split: str = "train"
    val_split: str | None = "val"
    options: dict[str, Any] = Field(default_factory=dict, description="reader options, e.g. granularity: 27")
    max_train_images: int | None = Field(None, ge=1, description="use the first N training images (demos)")
    max_val_images: int | None = Field(None, ge=1)
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="larger images are refused from their header, before decoding (memory bound)"
    )


class BackboneConfig(_Base):
    """Frozen self-supervised ViT."""

    arch: str = Field("vit_small_patch8", description="DINO v1 (vit_small_patch8, ...), DINOv2 with registers "
                      "(vit_small_patch14_reg4_dinov2, ...) or DINOv3 (vit_small_patch16_dinov3, ...)")
    weights: str = Field("none", description="'none', 'timm', 'hub:<tag>' or a .pth/.safetensors path (timm's, DINO's, "
                         "or an official DINOv2/DINOv3 release file)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA devices that support it, fp32 otherwise"
    )
    pos_embed: Literal["timm", "dino"] = Field(
        "timm", description="position-embedding resampling: timm's resample_abs_pos_embed, or DINO's '+0.1' bicubic"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from transfgu.models.backbone import ARCHS

        if v not in ARCHS:
            raise ValueError(f"unknown arch {v!r}; choose one of {sorted(ARCHS)}")
        return v

    @property
    def source(self) -> BackboneSource:
        """``weights`` parsed: kind (random/timm/hub/file), tag or absolute path, pretrained."""
        return parse_source(self.weights)


class CropConfig(_Base):
    """Sliding windows and the foreground prior (the reference's crop stage)."""

    input_size: tuple[int, int] = (640, 640)
    resize_mode: Literal["bilinear", "nearest"] = Field(
        "bilinear", description="the reference uses nearest for COCO, bilinear elsewhere"
    )
    betas: list[float] = Field(default_factory=lambda: [0.5, 0.4, 0.3, 0.2])
    selection: Literal["fg_bg", "fg", "all"] = "fg_bg"
    th_fg: float = Field(0.5, ge=0, le=1)
    th_bg: float = Field(0.8, ge=0, le=1)
    crop_size: int = Field(320, ge=8)
    batch_size: int = Field(64, ge=1)
    trim_last_pixel: bool = Field(True, description="the reference's one-pixel-short crops; false = full windows")

    _size = field_validator("input_size")(_check_size)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("betas must not be empty")
        bad = [b for b in v if not 0 < b <= 1]
        if bad:
            raise ValueError(f"every beta must lie in (0, 1], got {bad}")
        return v


class ConceptConfig(_Base):
    """k-means concepts: K per pool, fg concepts first."""

    k_per_pool: dict[str, int] = Field(default_factory=lambda: {"fg": 12, "bg": 15})
    niter: int = Field(100, ge=1)
    seed: int = 1
    algorithm: Literal["faiss", "minibatch_kmeans"] = Field(
        "faiss", description="minibatch_kmeans = sklearn MiniBatchKMeans as the reference for Cityscapes/LIP "
        "(then niter is max_iter and the reference uses seed 0)"
    )

    @field_validator("k_per_pool")
    @classmethod
    def _k(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("k_per_pool must name at least one pool")
        for pool, k in v.items():
            if pool not in ("fg", "bg", "all"):
                raise ValueError(f"unknown pool {pool!r} (use fg, bg or all)")
            if k < 1:
                raise ValueError(f"K must be >= 1, got {k} for pool {pool!r}")
        return v

    @property
    def k(self) -> int:
        return sum(self.k_per_pool.values())


class PseudoLabelConfig(_Base):
    """Attention Grad-CAM label bank (paper eq. 5-8)."""

    input_size: tuple[int, int] = (320, 320)
    resize_mode: Literal["bilinear", "nearest"] = "bilinear"
    grad_scale: float = Field(0.125, gt=0, description="per-image objective scale; 1/8 = reference batch of 8")
    mass: float = Field(0.8, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32 on every device (the decisions hinge on ~3e-5 gaps); bf16 = opt-in autocast of "
        "blocks 1..L-1, agreement with fp32 measured by bench/label_bank_agreement.py"
    )

    _size = field_validator("input_size")(_check_size)


class TrainConfig(_Base):
    """Decoder training and bootstrapping (paper §3.3)."""

    variant: Literal["thingstuff", "things"] = "thingstuff"
    train_size: tuple[int, int] = (320, 320)
    batch_size: int = Field(256, ge=1)
    epochs: int = Field(200, ge=1)
    repeat: int = Field(1, ge=1, description="passes over the training set per epoch")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    w_div: float = Field(1.0, ge=0, description="omega_1, diversity weight (eq. 16)")
    w_unc: float = Field(0.3, ge=0, description="omega_2, uncertainty weight (eq. 16)")
    teacher_intervals: list[int] = Field(default_factory=lambda: [2])
    bootstrap_start: int = Field(2, ge=0)
    t_bg: float = Field(0.1, ge=0, le=1)
    teacher_mix: float = Field(0.5, ge=0, le=1)
    colour_aug: Literal["batch", "per_sample"] = Field("batch", description="batch = the reference's behaviour")
    cls_emb_init: Literal["reference", "orthogonal"] = "orthogonal"
    dropout: float = Field(0.1, ge=0, lt=1, description="decoder attention/MLP dropout (0.1 = the reference)")
    clamp_grad: float = Field(1.0, gt=0)
    skip_nonpositive: bool = True
    empty_fg: Literal["zero", "nan"] = Field(
        "zero", description="uncertainty loss with no foreground pixel: 0 (fix) or NaN -> skipped step (reference)"
    )
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader processes reading/decoding the training input; auto = the process's CPUs "
        "less one, at most 8, 0 on <= 2 CPUs (not part of the train hash: results do not depend on it)"
    )
    image_store: bool = Field(
        True, description="write the training images once at the train size (uint8, next to the label bank) so "
        "epochs do not decode JPEGs again; 3*H*W bytes an image (not part of the train hash)"
    )
    select: Literal["last", "best_val"] = Field(
        "last", description="last = final epoch; best_val = best validation mIoU + acc (the paper's protocol, uses "
        "validation labels for model selection)"
    )
    validate_every: int = Field(0, ge=0, description="record validation scores every N epochs (0 = only for best_val)")

    _size = field_validator("train_size")(_check_size)

    @field_validator("teacher_intervals")
    @classmethod
    def _intervals(cls, v: list[int]) -> list[int]:
        if not v or any(i < 1 for i in v):
            raise ValueError(f"teacher_intervals must be positive integers, got {v}")
        return v


class EvalConfig(_Base):
    """Evaluation (one Hungarian matching over the whole split, as the reference)."""

    eval_size: tuple[int, int] = (320, 320)
    overcluster: Literal["hungarian", "majority"] = "hungarian"
    batch_size: int = Field(16, ge=1)

    _size = field_validator("eval_size")(_check_size)


class RunConfig(_Base):
    """Where outputs go and how the run executes."""

    root: Path = Path("runs")
    name: str = "demo"
    seed: int = 2021
    device: Literal["auto", "cpu", "cuda"] = "auto"
    error_budget: float = Field(0.05, ge=0, le=1, description="max fraction of unreadable images")
    report: bool = True
    write_threads: int | None = Field(
        None, ge=1, description="Parquet writer threads of the one-process extract/label-bank stages (None = the "
        "node's CPUs less one, at most 8; throughput.default_writer_threads); the files are the same for any value",
    )

    @field_validator("name")
    @classmethod
    def _name_not_path(cls, v: str) -> str:
        # The run directory is always <run.root>/<run.name>: a name with a separator or ".." would put it elsewhere.
        return check_name(v, "run.name")


class MlflowConfig(_Base):
    """Tracking: an embedded SQLite store under the run root unless a URI (or MLFLOW_TRACKING_URI) is given."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "transfgu"
    log_model: bool = Field(True, description="log the trained model as an MLflow pyfunc model on the pipeline run")
    registered_model: str | None = Field(
        None, description="register the logged model under this name (default: <method>-<run.name>; a sweep: "
        "<method>-<sweep name> for its best trial); '' = log it without registering")
    system_metrics: bool = Field(True, description="sample CPU/memory/GPU into stage and trial runs")
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between system-metric samples")


class RayConfig(_Base):
    """Ray resources for the distributed pipeline (ignored by the one-process pipeline)."""

    address: str | None = Field(
        None, description="None = RAY_ADDRESS if set, else start a local Ray; 'auto' = the `ray start` on this machine"
    )
    num_workers: int = Field(1, ge=0, description="Ray Train workers (0 = Train V2 local mode)")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="true: request GPUs (an autoscaler adds GPU nodes); false: CPU only; auto: only for a "
        "private local Ray (uses its GPUs if any); refused on a remote cluster, where it would guess from the nodes "
        "that happen to be up",
    )
    gpu_wait_s: float = Field(
        600.0, ge=0, description="with use_gpu=true: seconds to wait for the autoscaler to bring GPUs before failing"
    )
    gpus_per_actor: float = Field(1.0, gt=0, description="GPU share of an extract/label-bank/k-means actor (<1 packs)")
    extract_actors: tuple[int, int | Literal["auto"]] = Field(
        (1, "auto"), description="(min, max) actors of the extract/label-bank pools; max auto = as many as the "
        "cluster's GPUs (GPU actors) or CPUs hold at submit time (cluster.actor_pool_bounds), at most one per shard; "
        "an integer above that is kept, for a cluster that autoscales",
    )
    decode_stage: bool | Literal["auto"] = Field(
        "auto", description="extract/label-bank on Ray: decode + resize in CPU tasks ahead of the actor pool (auto: "
        "when the actors get GPUs; false: each actor decodes its own shards)",
    )
    decode_cpus: float = Field(1.0, gt=0, description="CPUs of each decoding task of the decode stage")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs of each actor (GPU actors too: decoding, batching)")
    kmeans_shards: int = Field(4, ge=1, description="at most this many k-means tasks per Lloyd iteration")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker (fractions allowed)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a Ray started by the job (None = all)")
    object_store_memory: int | None = Field(None, ge=78643200, description="bytes, for a Ray started by the job")
    include_dashboard: bool = Field(False, description="start the dashboard (needed for the Jobs API)")
    storage_path: str | None = Field(
        None, description="Ray Train/Tune storage (shared FS or s3://...); default <run>/ray_results"
    )
    fit_per_round: bool = Field(
        True, description="one TorchTrainer fit per bootstrapping round (False: one fit for all epochs)"
    )
    trial_cpus: float = Field(0.5, gt=0, description="CPUs of a Tune trial's driver function")

    @field_validator("extract_actors")
    @classmethod
    def _pool(cls, v: tuple[int, int | str]) -> tuple[int, int | str]:
        if v[0] < 1 or (v[1] != "auto" and v[1] < v[0]):
            raise ValueError(f"extract_actors must be (min >= 1, max >= min or auto), got {v}")
        return v


#: ``protocol: paper`` -- every reference behaviour that differs from the defaults here (issue 12 item 4; the table
#: of docs/fidelity.md). Values that depend on the data set are added by :func:`paper_protocol`.
PAPER_PROTOCOL: dict[str, Any] = {
    "train.cls_emb_init": "reference",  # orthogonal_ on (1, K, D): pieces of one random unit vector
    "backbone.precision": "fp32",  # no bf16 autocast on CUDA (the reference runs float32)
    "pseudo.precision": "fp32",
    "backbone.pos_embed": "dino",  # DINO's "+0.1" bicubic position-embedding interpolation
    "train.select": "best_val",  # Table 1 reports the best epoch on val (mIoU + acc)
}


class LeopartGridConfig(_Base):
    """``leopart.protocol: paper`` only: the grid over which community detection's hyperparameters are chosen WITH
    THE TRAINING SPLIT'S LABELS (the authors ran Optuna TPE over these ranges on PVOC train, docs/leopart.md;
    here an exhaustive grid, scored by Hungarian mIoU on train at ``eval_size``). A one-value list fixes a key."""

    k_community: list[int] = Field(default_factory=lambda: [99, 149, 199], description="authors: 99..249 step 10")
    markov_time: list[float] = Field(default_factory=lambda: [0.4, 1.0, 1.5, 2.0], description="authors: 0.1..2.0")
    edge_threshold: list[float] = Field(default_factory=lambda: [0.05, 0.07, 0.09],
                                        description="authors: 0.01..0.10")

    @field_validator("k_community", "markov_time", "edge_threshold")
    @classmethod
    def _nonempty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("a grid needs at least one value")
        if any(x <= 0 for x in v):
            raise ValueError(f"grid values must be > 0, got {v}")
        return v


class LinearProbeConfig(_Base):
    """Optional linear probe of the frozen dense patch tokens (the Leopart paper's appendix A.1, "Evaluation
    details"): a linear layer trained WITH THE TRAINING SPLIT'S LABELS, scored on val by mIoU (no matching: it
    predicts classes)."""

    enabled: bool = False
    epochs: int = Field(25, ge=1, description="authors: 25")
    lr: float = Field(0.01, gt=0, description="authors: 0.01 (0.1 for MaskContrast / MoCo-v2)")
    lr_drop_epoch: int = Field(20, ge=0, description="the learning rate is divided by 10 from this epoch (authors: 20)")
    batch_size: int = Field(120, ge=1, description="images per step (authors: 120)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (the appendix does not name the optimiser)")
    train_size: tuple[int, int] = Field((100, 100), description="training masks (authors: 100 x 100)")
    eval_size: tuple[int, int] = Field((448, 448), description="evaluation masks (authors: 448 x 448)")
    weight_decay: float | None = Field(None, ge=0, description="SGD weight decay; None = 0 (label_free) or the "
                                       "authors' 1e-4 (protocol: paper)")
    augment: bool | None = Field(None, description="RandomResizedCrop (scale 0.8-1) + horizontal flip of the "
                                 "training maps; None = off (label_free) or on (protocol: paper)")

    _size = field_validator("train_size", "eval_size")(_check_size)


class LeopartConfig(_Base):
    """Leopart's fully unsupervised segmentation, CBFE + community detection (the Leopart paper's appendix
    A.1; the authors' script step by step: docs/leopart.md). Used when ``method: leopart``; defaults are the
    published ViT-S/16 PVOC choices.

    ``protocol: label_free`` (default) fits everything on the training split without labels: the CBFE precision
    threshold, Markov time and edge threshold are fixed values. ``protocol: paper`` chooses the CBFE threshold as the
    authors do, from the foreground IoU against the *training split's ground truth* (cuts putting 55-75 % of the
    clusters in the background, rounded to 0.05), and ``k_community``, Markov time and edge threshold by a grid search
    (``paper_grid``) scored by Hungarian mIoU on the *training split's labels*: a run with it uses labels and says so
    in its metrics.
    """

    protocol: Literal["label_free", "paper"] = "label_free"
    input_size: tuple[int, int] = Field((448, 448), description="images are resized to this before the ViT")
    batch_size: int = Field(8, ge=1, description="images per backbone pass")
    pca_dim: int = Field(50, ge=1, description="PCA dimensions after standardisation (authors: 50)")
    attn_mass: float = Field(0.65, gt=0, le=1, description="attention mass kept by the noisy foreground mask")
    blur_kernel: int = Field(7, ge=1, description="Gaussian blur of the attention map, kernel size (odd)")
    blur_sigma: float = Field(0.6, gt=0)
    min_component: int = Field(3, ge=1, description="mask components smaller than this many patches are dropped")
    k_cbfe: int = Field(200, ge=2, description="spherical k-means clusters for CBFE (authors: 200)")
    cbfe_niter: int = Field(100, ge=1)
    cbfe_nredo: int = Field(5, ge=1, description="k-means restarts, lowest objective kept (authors: 5)")
    kmeans_points: Literal["l2_normalized", "raw"] = Field(
        "l2_normalized", description="spherical k-means (CBFE, overclustering) of the L2-normalised points, or of the "
        "raw PCA points with unit centroids as faiss's spherical option does (authors: raw)",
    )
    kmeans_max_points_per_centroid: int | None = Field(
        None, ge=1, description="faiss's subsampling: every Leopart k-means trains on at most this many points per "
        "centroid (authors: faiss's default, 256); None = every point",
    )
    community_nredo: int = Field(1, ge=1, description="restarts of the community overclustering k-means")
    precision_threshold: float = Field(
        0.4, ge=0, le=1, description="label_free: clusters at or above this precision are foreground (Table 1: 40 %)"
    )
    k_community: int = Field(149, ge=2, description="foreground overclustering (authors, ViT-S/16: 149)")
    community_niter: int = Field(100, ge=1)
    cooc_size: tuple[int, int] | None = Field(
        (100, 100), description="cluster maps are resized (nearest) to this before co-occurrence; None = patch grid"
    )
    edge_threshold: float = Field(0.09, ge=0, le=1, description="co-occurrence probability below which edges go")
    markov_time: float = Field(2.0, gt=0)
    n_communities: int | None = Field(
        None, ge=1, description="Infomap's preferred number of modules; None = foreground classes of the data set"
    )
    infomap_trials: int = Field(1, ge=1)
    seed: int = 0
    eval_size: tuple[int, int] = Field((100, 100), description="Hungarian evaluation resolution (authors: 100x100)")
    overcluster_k: list[int] = Field(
        default_factory=lambda: [100, 300, 500],
        description="overclustering evaluations (many-to-one with labels); [] = none",
    )
    unmatched: Literal["error", "background"] = Field(
        "error", description="pixels of communities Hungarian leaves unmatched: errors (strict) or background (paper)"
    )
    paper_grid: LeopartGridConfig = Field(default_factory=LeopartGridConfig)
    linear_probe: LinearProbeConfig = Field(default_factory=LinearProbeConfig)
    # -- what protocol: paper changes besides the label-chosen hyperparameters (None = the protocol's choice; the
    # -- label_free value first, the authors' second; docs/leopart.md, "protocol: paper")
    cbfe_attention: Literal["backbone", "weights"] = Field(
        "backbone", description="CBFE's noisy foreground from the evaluated backbone's attention, or from another "
        "ViT given by cbfe_attention_arch / cbfe_attention_weights (the authors: DINO ViT-S/16)")
    cbfe_attention_arch: str = Field("vit_small_patch16", description="architecture of cbfe_attention: weights")
    cbfe_attention_weights: str | None = Field(None, description="weights file of cbfe_attention: weights")
    fit_splits: Literal["train", "train+val"] | None = Field(
        None, description="data the PCA, the k-means of CBFE and of the communities and the co-occurrence are "
        "fitted on: train | train+val (authors: transductive)")
    val_precision: Literal["train", "val"] | None = Field(
        None, description="CBFE foreground of val patches: the training split's cluster flags | flags from val's "
        "own attention masks (authors)")
    cooc_angles: Literal["even", "authors"] | None = Field(
        None, description="co-occurrence angles: 8 even | the authors' list (4 pi / 3 in place of 5 pi / 4)")
    cooc_presence: Literal["occurs", "row_sum"] | None = Field(
        None, description="an image counts for a cluster's row where the cluster occurs | where its row sum is > 0 "
        "(authors)")
    match: Literal["pixels", "iou"] | None = Field(
        None, description="Hungarian matching maximises matched pixels | IoU (authors)")
    infomap_runs: int | None = Field(
        None, ge=1, description="Infomap seeds seed .. seed + n - 1 evaluated, mean +- std reported (authors: 10, "
        "seeds 0-9); the model keeps the first; None = 1 (label_free) or 10 (paper)")
    overcluster_split: Literal["train", "val"] | None = Field(
        None, description="overclustering k-means fitted on train | val (authors)")
    overcluster_seeds: int | None = Field(None, ge=1, description="overclustering seeds averaged (authors: 5)")
    overcluster_spherical: bool | None = Field(None, description="overclustering k-means spherical (authors: no)")

    _size = field_validator("input_size", "eval_size")(_check_size)

    @model_validator(mode="after")
    def _protocol_choices(self) -> LeopartConfig:
        """Fill every ``None`` choice from ``protocol`` (an explicit value always wins)."""
        paper = self.protocol == "paper"
        choices = {"fit_splits": ("train", "train+val"), "val_precision": ("train", "val"),
                   "cooc_angles": ("even", "authors"), "cooc_presence": ("occurs", "row_sum"),
                   "match": ("pixels", "iou"), "infomap_runs": (1, 10), "overcluster_split": ("train", "val"),
                   "overcluster_seeds": (1, 5), "overcluster_spherical": (True, False)}
        for key, (free, authors) in choices.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, authors if paper else free)
        lp = self.linear_probe
        if lp.weight_decay is None:
            object.__setattr__(lp, "weight_decay", 1e-4 if paper else 0.0)
        if lp.augment is None:
            object.__setattr__(lp, "augment", paper)
        if paper and "unmatched" not in self.model_fields_set:
            object.__setattr__(self, "unmatched", "background")
        if paper:  # the authors' k-means: faiss on the raw points, default subsampling, 5 restarts
            for key, authors in (("kmeans_points", "raw"), ("kmeans_max_points_per_centroid", 256),
                                 ("community_nredo", 5)):
                if key not in self.model_fields_set:
                    object.__setattr__(self, key, authors)
        if self.cbfe_attention == "weights" and not self.cbfe_attention_weights:
            raise ValueError("leopart.cbfe_attention=weights needs leopart.cbfe_attention_weights (a DINO ViT-S/16 "
                             "weights file)")
        return self

    @field_validator("blur_kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {v}")
        return v

    @field_validator("overcluster_k")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if any(k < 2 for k in v):
            raise ValueError(f"every overclustering K must be >= 2, got {v}")
        return v


class FinetuneConfig(_Base):
    """Leopart's dense self-supervised fine-tuning of the backbone (the Leopart paper's appendix A.1;
    ``method: leopart_finetune``). Defaults are the appendix's recipe; the output is
    ``<run>/finetune/backbone.safetensors``, a ``backbone.weights=`` file for any other run."""

    epochs: int = Field(50, ge=1, description="training epochs over the training split (appendix: 50)")
    batch_size: int = Field(64, ge=1, description="images per global step, over all workers (authors: 32 x 2 GPUs)")
    n_global: int = Field(2, ge=1, description="global crops per image")
    n_local: int = Field(4, ge=0, description="local crops per image")
    global_size: int = Field(224, ge=8, description="global crop side after resizing (appendix: 224)")
    local_size: int = Field(96, ge=8, description="local crop side after resizing (appendix: 96)")
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    min_intersection: float = Field(0.01, ge=0, lt=1, description="every local crop meets every global crop by at "
                                    "least this fraction of the image (appendix: 1 %)")
    global_overlap: float = Field(0.02, ge=0, lt=1, description="two global crops overlap by more than this "
                                  "fraction of the image (authors' code: 2 %)")
    max_side: int = Field(448, ge=16, description="images are decoded with their longer side at most this")
    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(256, ge=1)
    n_prototypes: int = Field(300, ge=2)
    queue_length: int = Field(8192, ge=0, description="length of each global crop's queue of embeddings added to "
                              "its Sinkhorn batch; 0 = none")
    queue_push: int = Field(320, ge=1, description="embeddings pushed to each global crop's queue per step "
                            "(authors: 320, foreground only)")
    loss_mask: Literal["foreground", "all"] = Field(
        "foreground", description="foreground = the loss and the queue pushes use foreground patches only (authors' "
        "code); all = every patch")
    fg_attention: Literal["teacher", "source"] = Field(
        "teacher", description="whose last-block CLS attention gives the foreground: the EMA teacher (authors) or "
        "the frozen source backbone")
    fg_mass: float = Field(0.6, gt=0, le=1, description="foreground = patches holding this much of the attention")
    temperature: float = Field(0.1, gt=0)
    sinkhorn_eps: float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(3, ge=1)
    align_size: int = Field(7, ge=1, description="RoIAlign output grid of the aligned maps (appendix: 7x7)")
    momentum: float = Field(0.9995, ge=0, le=1, description="EMA momentum at step 0, cosine to 1")
    lr_head: float = Field(1e-4, gt=0)
    lr_backbone: float = Field(1e-5, ge=0)
    optimizer: Literal["adamw", "adam"] = Field(
        "adamw", description="adamw = decoupled weight decay (authors' code); adam = L2 added to the gradient")
    weight_decay: tuple[float, float] = Field((0.04, 0.5), description="cosine weight-decay schedule start, end")
    decay_tokens: bool = Field(True, description="decay the CLS token and position embedding too (authors' code)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="student stochastic depth, linear in depth up to this")
    jitter: tuple[float, float, float, float] = Field(
        (0.8, 0.8, 0.8, 0.2), description="colour jitter brightness, contrast, saturation, hue (authors' code)")
    jitter_p: float = Field(0.8, ge=0, le=1)
    blur_kernel: int | None = Field(None, ge=1, description="Gaussian blur kernel; None = grows with sigma (PIL)")
    train_blocks: int | None = Field(None, ge=0, description="fine-tune only the last N ViT blocks; None = all")
    export: Literal["teacher", "student"] = Field(
        "student", description="the backbone.safetensors written: the student (what the authors evaluate) or the "
        "EMA teacher; the other is written too (backbone_<other>.safetensors)")
    seed: int = 0


def paper_protocol(data_name: str) -> dict[str, Any]:
    """The dotted settings ``protocol: paper`` imposes for data set ``data_name``."""
    out = dict(PAPER_PROTOCOL)
    if data_name in ("cityscapes", "lip"):
        out["concepts.algorithm"] = "minibatch_kmeans"  # sklearn MiniBatchKMeans, as the reference
        out["concepts.seed"] = 0  # its random_state
    if data_name == "coco_stuff":
        out["data.options.with_instances"] = True  # instances_<split>2017.json lists: 117,266 / 4,952 images
    return out


#: The method of a configuration that names none (every TransFGU preset).
DEFAULT_METHOD = "transfgu"


class Config(_Base):
    """The sections every method reads. A run's configuration is one of the subclasses, chosen by ``method``.

    The configuration is a union discriminated on ``method`` (:data:`AnyConfig`): :class:`TransfguMethodConfig`,
    :class:`LeopartMethodConfig` or :class:`LeopartFinetuneMethodConfig`, each the shared sections here plus its own
    method's. A Leopart run has no ``train`` section and a TransFGU run no ``leopart`` one, so ``config.yaml``, the
    MLflow params and the report show the run's method only, and a section of another method is refused with one line
    naming it (:func:`foreign_key_message`). :func:`load_config` and ``Config.model_validate`` return the subclass.
    """

    method: str = Field(DEFAULT_METHOD, description="transfgu = the TransFGU stages; leopart = Leopart CBFE + "
                        "community detection; leopart_finetune = Leopart's dense fine-tuning of the backbone")
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    #: The method as the papers name it, for messages.
    title: ClassVar[str] = "shared"

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Config:  # type: ignore[override]
        """On :class:`Config` itself: the configuration of ``obj``'s method (validated as :data:`AnyConfig`)."""
        if cls is Config:
            return _ANY_CONFIG.validate_python(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _own_sections_only(cls, data: Any) -> Any:
        if cls is Config:
            raise ValueError("Config holds only the shared sections: build a run's configuration with load_config or "
                             "Config.model_validate (the class of its method)")
        if isinstance(data, dict):
            for key in data:
                msg = foreign_key_message(cls, str(key))
                if msg:
                    raise ValueError(msg)
        return data

    @model_validator(mode="after")
    def _paper_backbone(self) -> Config:
        """Both papers used DINO v1 ViTs: a paper protocol on another backbone is allowed, and said."""
        from transfgu.models.backbone import PAPER_ARCHS, TEST_ARCHS

        arch = self.backbone.arch
        if self.follows_paper and arch not in PAPER_ARCHS + TEST_ARCHS:
            logging.getLogger("transfgu").warning(
                "protocol=paper reproduces the papers, which used DINO v1 backbones (%s); backbone.arch=%s is not "
                "one of them, so the numbers are not comparable with the papers'", ", ".join(PAPER_ARCHS), arch)
        return self

    @property
    def follows_paper(self) -> bool:
        """The run reproduces its paper's protocol (each method's config says what that means for it)."""
        return False

    @property
    def run_dir(self) -> Path:
        return self.run.root / self.run.name

    def method_dump(self) -> dict[str, Any]:
        """The config as plain data: the shared sections and the run's method's (what ``config.yaml``, the MLflow
        params and the report show). Reading it back gives the same config."""
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.method_dump(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (MLflow params, Tune spaces)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict) and obj:
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = obj

        walk("", self.method_dump())
        return out


class TransfguMethodConfig(Config):
    """A TransFGU run (``method: transfgu``, the default): crops, concepts, pseudo labels, training, evaluation.

    ``protocol: paper`` sets every reference behaviour of :func:`paper_protocol` at once (docs/fidelity.md); a key
    that the configuration sets explicitly to another value is an error, so a run never mixes the two silently.
    """

    title: ClassVar[str] = "TransFGU"
    method: Literal["transfgu"] = Field("transfgu", description="the TransFGU stages")
    protocol: Literal["default", "paper"] = Field(
        "default", description="paper = the authors' behaviour everywhere (see docs/fidelity.md), default = fixes on"
    )
    crops: CropConfig = Field(default_factory=CropConfig)
    concepts: ConceptConfig = Field(default_factory=ConceptConfig)
    pseudo: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_protocol(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("protocol") != "paper":
            return data
        data = json.loads(json.dumps(data, default=str))  # a deep copy, never the caller's dict
        name = (data.get("data") or {}).get("name", DataConfig().name)
        for key, value in paper_protocol(name).items():
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            if leaf in node and node[leaf] != value:
                raise ValueError(
                    f"protocol=paper sets {key}={value!r} but the configuration sets {node[leaf]!r}; drop that key "
                    "or use protocol=default"
                )
            node[leaf] = value
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TransfguMethodConfig:
        pools = set(self.concepts.k_per_pool)
        sel = self.crops.selection
        allowed = {"fg_bg": {"fg", "bg"}, "fg": {"fg"}, "all": {"all"}}[sel]
        if self.train.select == "best_val" and (self.data.val_split is None or self.data.name == "folder"):
            raise ValueError("train.select=best_val needs a labelled validation split (data.val_split)")
        if not pools <= allowed:
            raise ValueError(
                f"concepts.k_per_pool pools {sorted(pools)} do not match crops.selection={sel!r} "
                f"(which yields pools {sorted(allowed)})"
            )
        return self

    @property
    def follows_paper(self) -> bool:
        return self.protocol == "paper"


class LeopartMethodConfig(Config):
    """A Leopart run (``method: leopart``): CBFE + community detection, every setting in ``leopart``."""

    title: ClassVar[str] = "Leopart"
    method: Literal["leopart"] = Field("leopart", description="Leopart CBFE + community detection")
    leopart: LeopartConfig = Field(default_factory=LeopartConfig)

    @property
    def follows_paper(self) -> bool:
        return self.leopart.protocol == "paper"


class LeopartFinetuneMethodConfig(Config):
    """A Leopart dense fine-tuning run (``method: leopart_finetune``): every setting in ``finetune``."""

    title: ClassVar[str] = "Leopart fine-tuning"
    method: Literal["leopart_finetune"] = Field("leopart_finetune",
                                                description="Leopart's dense fine-tuning of the backbone")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


#: ``method`` -> its configuration class (the methods themselves are in :mod:`transfgu.methods`; each ``Method``
#: names its class here).
METHOD_CONFIGS: dict[str, type[Config]] = {
    c.model_fields["method"].default: c
    for c in (TransfguMethodConfig, LeopartMethodConfig, LeopartFinetuneMethodConfig)
}

#: The config keys only one method reads (the others, :class:`Config`'s fields, are shared).
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    name: tuple(k for k in cls.model_fields if k not in Config.model_fields) for name, cls in METHOD_CONFIGS.items()
}


def _method_tag(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("method", DEFAULT_METHOD)
    return getattr(value, "method", None)


#: A run's configuration: the union of the method configurations, discriminated on ``method`` (default transfgu).
AnyConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in METHOD_CONFIGS.items())],  # noqa: UP007
    Discriminator(_method_tag),
]
_ANY_CONFIG: TypeAdapter[Config] = TypeAdapter(AnyConfig)


def config_class(method: Any) -> type[Config]:
    """The configuration class of ``method``; a :class:`ConfigError` naming the known methods otherwise."""
    if not isinstance(method, str) or method not in METHOD_CONFIGS:
        raise ConfigError(f"method: unknown method {method!r}; choose one of {', '.join(sorted(METHOD_CONFIGS))}")
    return METHOD_CONFIGS[method]


def foreign_key_message(cls: type[Config], key: str) -> str | None:
    """One line saying that top-level ``key`` belongs to another method than ``cls``'s (None if it does not)."""
    if key in cls.model_fields:
        return None
    for name, other in METHOD_CONFIGS.items():
        if other is not cls and key in other.model_fields:
            ann = other.model_fields[key].annotation
            kind = "section" if isinstance(ann, type) and issubclass(ann, BaseModel) else "setting"
            mine = cls.model_fields["method"].default
            return (f"`{key}` is a {other.title} {kind} (method {name}); method {mine} reads "
                    f"{', '.join(k for k in cls.model_fields if k != 'method')}: remove `{key}` or set method: {name}")
    return None


def drop_foreign_sections(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` without the top-level keys of other methods than its own, and those keys: a ``config.yaml`` written
    by an older version holds every method's sections (reading a run directory back; a config given to a run is
    refused instead)."""
    cls = METHOD_CONFIGS.get(str(data.get("method", DEFAULT_METHOD)))
    if cls is None:
        return data, []
    dropped = [k for k in data if foreign_key_message(cls, str(k))]
    return {k: v for k, v in data.items() if k not in dropped}, dropped


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and says what to change."""


#: Bounds on configuration text (a file or one ``key=value`` override): a real preset is a few KB, ten levels deep,
#: with no or few YAML aliases. The bounds refuse a "billion laughs" document (aliases of aliases that expand
#: exponentially when the config is copied, hashed or validated) and a deeply nested one (the parser recurses).
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_ALIASES = 64
MAX_CONFIG_NODES = 100_000  # scalars, lists and mappings after expanding every alias


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting and many aliases while composing (before anything is built)."""

    def __init__(self, stream: str, source: str) -> None:
        super().__init__(stream)
        self._source, self._depth, self._aliases = source, 0, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_CONFIG_ALIASES:
                raise ConfigError(f"{self._source}: more than {MAX_CONFIG_ALIASES} YAML aliases (*name); write the "
                                  "values out")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{self._source}: nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_nodes(obj: Any, source: str) -> int:
    """Nodes of ``obj`` counting every alias target as many times as it is referenced (what a deep copy builds)."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def walk(o: Any) -> int:
        if not isinstance(o, (dict, list)):
            return 1
        key = id(o)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to itself (recursive structure)")
        active.add(key)
        items = list(o.keys()) + list(o.values()) if isinstance(o, dict) else o
        n = 1
        for x in items:
            n += walk(x)
            if n > MAX_CONFIG_NODES:
                raise ConfigError(f"{source}: expands to more than {MAX_CONFIG_NODES} values (YAML aliases "
                                  "referencing aliases?)")
        active.discard(key)
        memo[key] = n
        return n

    return walk(obj)


def load_yaml_text(text: str, source: str) -> Any:
    """``yaml.safe_load`` of configuration text, bounded in size, nesting, aliases and expanded size; any problem is
    one :class:`ConfigError` naming ``source``."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters, more than the {MAX_CONFIG_BYTES} bytes a configuration "
                          "may hold")
    loader = _BoundedLoader(text, source)
    try:
        data = loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()
    _expanded_nodes(data, source)
    return data


def _parse_value(text: str, key: str = "value") -> Any:
    try:
        return load_yaml_text(text, f"override {key!r}")
    except yaml.YAMLError:
        return text


def _method_of(data: dict[str, Any], overrides: Sequence[str]) -> str:
    """The method the configuration ends up with: the last ``method=`` override, else the file's, else the default."""
    method = data.get("method", DEFAULT_METHOD)
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and key.strip() == "method":
            method = _parse_value(text, key)
    return config_class(method).model_fields["method"].default


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, checking keys against the model of
    the method the configuration ends up with (a key of another method is refused, :func:`foreign_key_message`)."""
    cls = config_class(_method_of(data, overrides))
    base_defaults: Any = json.loads(cls().model_dump_json())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        depth = _check_key(parts, key, cls, f"override {item!r}")
        node = data
        defaults = base_defaults
        for i, p in enumerate(parts[:-1]):
            defaults = defaults.get(p, {}) if isinstance(defaults, dict) else {}
            # Entering a free-form dict (e.g. concepts.k_per_pool): start from its default, not from empty.
            fill = defaults if i + 1 >= depth and isinstance(defaults, dict) else {}
            node = node.setdefault(p, dict(fill))
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(text, key)
    return data


def _check_key(parts: list[str], key: str, cls: type[Config], source: str) -> int:
    """Check the model part of a dotted key; returns how many leading parts are model fields."""
    foreign = foreign_key_message(cls, str(parts[0]))
    if foreign:
        raise ConfigError(f"{source}: {foreign}")
    model: Any = cls
    for i, p in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return i  # inside a free-form dict (e.g. data.options)
        if p not in fields:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown config key {key!r}: {p!r} is not a field of {where} (known: {sorted(fields)})")
        ann = fields[p].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return i + 1
    return len(parts)


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        got = repr(err.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        parts.append(f"{loc or '(config)'}: {str(err['msg']).replace(chr(10), ' ')} (got {got})")
    # One line: a refusal is one line on stderr (docs/reliability.md, "Trust boundaries").
    return "invalid configuration: " + "; ".join(parts)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                drop_other_methods: bool = False) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None), apply overrides, validate: the configuration class
    of its ``method`` (:data:`METHOD_CONFIGS`). A key of another method is refused with one line naming it, unless
    ``drop_other_methods`` (reading back a run directory's ``config.yaml`` of an older version, which held every
    method's sections)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} a configuration "
                              "file may hold")
        try:
            loaded = load_yaml_text(p.read_text(encoding="utf-8"), str(p)) or {}
        except yaml.YAMLError as exc:  # a syntax error, or a tag such as !!python/object (safe_load refuses it)
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: not a readable YAML file{where}: {getattr(exc, 'problem', None) or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not a readable YAML file (not UTF-8 text): {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
        if drop_other_methods:
            data, dropped = drop_foreign_sections(data)
            if dropped:
                logging.getLogger("transfgu").info("%s: sections of other methods left out: %s", p, ", ".join(dropped))
    cls = config_class(_method_of(data, overrides))
    for key in data:
        _check_key([key], key, cls, str(path) if path is not None else "config")
    data = apply_overrides(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(Path(path), cfg.to_yaml())


def n_output_channels(cfg: Config) -> int:
    """Decoder channels: K concepts, plus the background channel 0 in the "things" variant (eq. 8)."""
    return cfg.concepts.k + (1 if cfg.train.variant == "things" else 0)
