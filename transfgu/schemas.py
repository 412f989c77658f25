"""Schemas of the files the program reads back from disk: ``model.json`` (both methods), a training round's
``state.json``, ``concepts.json``, the run manifest ``_manifest.json``, and the arrays of the weight files.

A file on disk is input like any other: it may have been edited, truncated, copied from another version or written
by someone else. Every reader validates it here, once per file kind, at load: unknown fields are refused
(``extra="forbid"``), every size is bounded, sizes that must agree are checked against each other (the cluster ->
class mapping has one entry per cluster, the concepts' pools add up to K, ...), and weights must be finite. A refusal
is one :class:`FileSchemaError` naming the file and the field, never a raw ``IndexError``/``KeyError`` later.

Kept free of torch (the Leopart predictor and the shard actors import it); tensors are checked through numpy views.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Bounds: far above any real checkpoint, low enough that no field can drive an unbounded allocation.
MAX_SIDE = 8192  # image sides (eval/train/input sizes): predictions run at these sizes
MAX_CLUSTERS = 4096  # decoder output channels, clusters, segments
MAX_CLASSES = 65535  # class names (label PNGs are 16-bit at most)
MAX_DIM = 16384  # token / feature dimensions
MAX_NAME = 4096  # any free-text string (paths, hashes, names)
MAX_ITEMS = 100_000  # list lengths of metadata (history, outputs, ...)
MAX_JSON_BYTES = 64 * 1024**2  # a metadata file (the largest, model.json with its config, is a few KB)

Name = Annotated[str, Field(max_length=MAX_NAME)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Size2 = tuple[Side, Side]
Count = Annotated[int, Field(ge=0)]

_Strict = ConfigDict(extra="forbid", frozen=False)


class FileSchemaError(ValueError):
    """A file read back from disk does not match its schema: the message names the file and the field."""

    def __init__(self, path: str | Path, field: str, problem: str) -> None:
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {problem}" if field == "(file)" else f"{path}: field {field!r}: {problem}")


class _Disagree(Exception):  # noqa: N818 -- not a ValueError, so pydantic lets it through with its field name
    """Raised by the cross-field validators: sizes that must agree do not."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = field, problem


# -- model.json ----------------------------------------------------------------------------------------------------
class BackboneMeta(BaseModel):
    model_config = _Strict
    arch: Annotated[str, Field(min_length=1, max_length=128)]
    weights: Name = "none"
    pretrained: bool = False
    prior: Name | None = None
    pos_embed: Literal["timm", "dino"] = "timm"


class DecoderMeta(BaseModel):
    model_config = _Strict
    n_classes: Annotated[int, Field(ge=1, le=MAX_CLUSTERS)]
    d_encoder: Annotated[int, Field(ge=1, le=MAX_DIM)]
    d_model: Annotated[int, Field(ge=1, le=MAX_DIM)] | None = None
    n_layers: Annotated[int, Field(ge=1, le=64)] | None = None
    n_heads: Annotated[int, Field(ge=1, le=1024)] | None = None
    cls_emb_init: Annotated[str, Field(max_length=64)] = "orthogonal"


# A file name inside the checkpoint directory, never a path out of it.
FileName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")]


class _ModelMetaBase(BaseModel):
    model_config = _Strict
    class_names: Annotated[list[Annotated[str, Field(max_length=MAX_NAME)]], Field(max_length=MAX_CLASSES)] = []
    cluster_to_class: Annotated[list[Annotated[int, Field(ge=-1, lt=MAX_CLASSES)]],
                                Field(max_length=MAX_CLUSTERS + 1)] | None = None
    config: dict[str, Any] = {}
    input_hash: Name | None = None
    backbone_file: FileName | None = None
    eval_size: Size2

    def _check_mapping(self, n_clusters: int, what: str) -> None:
        m = self.cluster_to_class
        if m is None:
            return
        if len(m) != n_clusters:
            raise _Disagree("cluster_to_class", f"has {len(m)} entries but the model has {n_clusters} {what}")
        if self.class_names and max(m, default=-1) >= len(self.class_names):
            raise _Disagree("cluster_to_class", f"names class {max(m)} but there are {len(self.class_names)} "
                             "class_names")


class TransfguModelMeta(_ModelMetaBase):
    """``model.json`` of a TransFGU checkpoint (format ``transfgu-model/1``)."""

    format: Literal["transfgu-model/1"]
    backbone: BackboneMeta
    decoder: DecoderMeta
    variant: Annotated[str, Field(max_length=64)] = "paper"
    k_per_pool: dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=1, le=MAX_CLUSTERS)]] = {}
    train_size: Size2 | None = None
    selection: Name = "last"
    selected_epoch: Count | None = None
    selected_round: Count | None = None
    selection_warning: Name | None = None
    imported_from: dict[str, Name] | None = None

    @model_validator(mode="after")
    def _sizes_agree(self) -> TransfguModelMeta:
        self._check_mapping(self.decoder.n_classes, "decoder channels (decoder.n_classes)")
        if self.k_per_pool and sum(self.k_per_pool.values()) > self.decoder.n_classes:
            raise _Disagree("k_per_pool", f"adds up to {sum(self.k_per_pool.values())} concepts but the decoder has "
                             f"{self.decoder.n_classes} channels")
        return self


class LeopartModelMeta(_ModelMetaBase):
    """``model.json`` of a CBFE + CD checkpoint (format ``leopart-model/1``); the mapping length is checked against
    the arrays (:func:`check_leopart_arrays`)."""

    format: Literal["leopart-model/1"]
    method: Literal["leopart"] = "leopart"
    backbone: BackboneMeta
    input_size: Size2


def validate_model_meta(path: str | Path, data: Any) -> dict[str, Any]:
    """``data`` (the parsed ``model.json`` at ``path``) checked against its format's schema; returned unchanged
    (the readers keep using the plain dict) or :class:`FileSchemaError`."""
    fmt = data.get("format") if isinstance(data, Mapping) else None
    cls = LeopartModelMeta if str(fmt).startswith("leopart-model") else TransfguModelMeta
    validate(path, data, cls)
    return dict(data)


# -- state.json / concepts.json / _manifest.json ---------------------------------------------------------------------
class StateInfo(BaseModel):
    """A training state's ``state.json`` (the JSON half of a resumable round / fine-tuning epoch)."""

    model_config = _Strict
    epoch: Annotated[int, Field(ge=0, le=1_000_000)]
    round: Annotated[int, Field(ge=0, le=10_000)] = 0
    input_hash: Name | None = None
    metrics: dict[str, Any] = {}
    history: Annotated[list[Any], Field(max_length=MAX_ITEMS)] = []
    optimizer: dict[str, Any]
    has_teacher: bool


class ConceptsMeta(BaseModel):
    """``concepts.json`` beside ``centroids.npy`` (the concept bank)."""

    model_config = _Strict
    format: Literal["transfgu.concepts/1"] = "transfgu.concepts/1"
    num_concepts: Annotated[int, Field(ge=1, le=MAX_CLUSTERS)]
    dim: Annotated[int, Field(ge=1, le=MAX_DIM)]
    pools: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_CLUSTERS)]
    k_per_pool: dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=1, le=MAX_CLUSTERS)]]
    seed: int
    niter: Annotated[int, Field(ge=0, le=1_000_000)]
    inertia: dict[str, float] = {}
    n_points: dict[str, Count] = {}
    extra: dict[str, Any] = {}
    input_hash: Name | None = None

    @model_validator(mode="after")
    def _sizes_agree(self) -> ConceptsMeta:
        if len(self.pools) != self.num_concepts:
            raise _Disagree("pools", f"has {len(self.pools)} entries but num_concepts is {self.num_concepts}")
        if sum(self.k_per_pool.values()) != self.num_concepts:
            raise _Disagree("k_per_pool", f"adds up to {sum(self.k_per_pool.values())}, num_concepts is "
                             f"{self.num_concepts}")
        if set(self.pools) - set(self.k_per_pool):
            raise _Disagree("pools", f"names {sorted(set(self.pools) - set(self.k_per_pool))} missing from k_per_pool")
        return self


class StageRecord(BaseModel):
    model_config = _Strict
    status: Literal["running", "done", "failed"]
    input_hash: Name | None = None
    started_at: Name | None = None
    finished_at: Name | None = None
    error: Annotated[str, Field(max_length=1_000_000)] | None = None
    rows: Count | dict[Name, Count] | None = None
    outputs: Annotated[list[Name], Field(max_length=MAX_ITEMS)] = []
    extra: dict[str, Any] = {}


class ManifestFile(BaseModel):
    """``<run>/_manifest.json``."""

    model_config = _Strict
    format: Literal["transfgu.manifest/1"] = "transfgu.manifest/1"
    updated_at: Name | None = None
    stages: dict[Annotated[str, Field(max_length=128)], StageRecord] = {}


# -- helpers -------------------------------------------------------------------------------------------------------
M = TypeVar("M", bound=BaseModel)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validate(path: str | Path, data: Any, cls: type[M]) -> M:
    """``cls.model_validate(data)``, or one :class:`FileSchemaError` naming ``path`` and the first bad field."""
    if not isinstance(data, Mapping):
        raise FileSchemaError(path, "(top level)", f"expected a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except _Disagree as exc:
        raise FileSchemaError(path, exc.field, exc.problem) from None
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not written by this version of transfgu)"
        n = exc.error_count()
        raise FileSchemaError(path, _loc(err.get("loc", ())), msg + (f" (and {n - 1} more)" if n > 1 else "")
                              ) from None


def check_finite(path: str | Path, arrays: Mapping[str, Any]) -> None:
    """Refuse weights with NaN/inf values (a diverged or corrupted file): they load fine and predict one class."""
    for name, a in arrays.items():
        arr = np.asarray(a.detach().float().cpu().numpy() if hasattr(a, "detach") else a)
        if arr.dtype.kind in "fc" and arr.size and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise FileSchemaError(path, name, f"{bad} of {arr.size} values are not finite (NaN or inf)")


def check_leopart_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None,
                         meta_path: str | Path | None = None) -> None:
    """The arrays of ``leopart.safetensors`` agree with each other (and ``model.json``'s mapping with them)."""
    need = ("pca_mean", "pca_std", "pca_components", "pca_eigenvalues", "cbfe_centroids", "cbfe_foreground")
    for k in need:
        if k not in arrays:
            raise FileSchemaError(path, k, "missing")
    check_finite(path, arrays)
    comp = arrays["pca_components"]
    if comp.ndim != 2:
        raise FileSchemaError(path, "pca_components", f"expected 2 dimensions, got shape {comp.shape}")
    p, d = int(comp.shape[0]), int(comp.shape[1])  # (output dims, input dims): y = ((x - mean) / std) @ comp.T
    for k in ("pca_mean", "pca_std"):
        if arrays[k].shape != (d,):
            raise FileSchemaError(path, k, f"shape {arrays[k].shape}, expected ({d},) (pca_components is {comp.shape})")
    c = arrays["cbfe_centroids"]
    if c.ndim != 2 or c.shape[1] != p or not 1 <= c.shape[0] <= MAX_CLUSTERS:
        raise FileSchemaError(path, "cbfe_centroids", f"shape {c.shape}, expected (K <= {MAX_CLUSTERS}, {p})")
    if arrays["cbfe_foreground"].shape != (c.shape[0],):
        raise FileSchemaError(path, "cbfe_foreground", f"shape {arrays['cbfe_foreground'].shape}, expected "
                              f"({c.shape[0]},)")
    cd = arrays.get("cd_centroids")
    if cd is not None and (cd.ndim != 2 or cd.shape[1] != p or not 1 <= cd.shape[0] <= MAX_CLUSTERS):
        raise FileSchemaError(path, "cd_centroids", f"shape {cd.shape}, expected (k <= {MAX_CLUSTERS}, {p})")
    c2s = arrays.get("cluster_to_segment")
    if c2s is None:
        return
    if cd is None or c2s.shape != (cd.shape[0] + 1,):
        want = "cd_centroids first" if cd is None else f"({cd.shape[0] + 1},)"
        raise FileSchemaError(path, "cluster_to_segment", f"shape {c2s.shape}, expected {want}")
    if c2s.size and (c2s.min() < 0 or c2s.max() >= MAX_CLUSTERS):
        raise FileSchemaError(path, "cluster_to_segment", f"values must lie in [0, {MAX_CLUSTERS})")
    n_segments = int(c2s.max()) + 1
    mapping = (meta or {}).get("cluster_to_class")
    if mapping is not None and len(mapping) != n_segments:
        raise FileSchemaError(meta_path or path, "cluster_to_class", f"has {len(mapping)} entries but the model has "
                              f"{n_segments} segments")


def read_json(path: str | Path, cls: type[M] | None = None, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read back from disk: bounded in size, bare ``NaN``/``Infinity`` refused, checked against ``cls``
    when given; every problem is one :class:`FileSchemaError` naming the file. Returns the plain parsed data."""
    import json

    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise FileSchemaError(p, "(file)", f"{size} bytes, more than the {max_bytes} any such file needs")

    def refuse(token: str) -> Any:
        raise FileSchemaError(p, "(file)", f"non-finite number {token} (not valid JSON)")

    try:
        data = json.loads(p.read_bytes().decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError as exc:
        raise FileSchemaError(p, "(file)", f"not UTF-8 text ({exc.reason})") from None
    except RecursionError:
        raise FileSchemaError(p, "(file)", "nested too deeply") from None
    except FileSchemaError:
        raise
    except ValueError as exc:
        raise FileSchemaError(p, "(file)", f"not valid JSON: {exc}") from None
    if cls is not None:
        validate(p, data, cls)
    return data
