"""The trained model as an MLflow model: a pyfunc flavor without pickle.

MLflow's ``python_model=`` pyfunc pickles a Python object (cloudpickle). This one uses the older, pickle-free form of
the flavor instead: ``loader_module="transfgu.mlflow_model"`` plus ``data_path`` = a copy of the run's ``model/``
checkpoint (``model.json`` + safetensors, :mod:`transfgu.checkpoint`). ``mlflow.pyfunc.load_model`` imports this
module and calls :func:`_load_pyfunc` on the copied folder, which is :func:`transfgu.predict.load`: one definition of
prediction for the CLI, the MLflow model, Ray Data batch prediction and the Serve endpoint. The ``transfgu`` package
travels with the model as a code path (no index serves it), so the model's ``requirements.txt`` lists only what
loading it imports, pinned to the versions it was logged with (those of ``requirements/lock.txt``): what
``mlflow models serve`` installs with its default environment manager.

Logged model layout (``runs:/<run>/model`` or ``models:/<name>/<version>``)::

    MLmodel                 flavor pyfunc, loader_module transfgu.mlflow_model, code, signature, metadata (below)
    MODEL_CARD.md           intended use, data, backbone prior, metrics, limitations (also in the run's model/)
    transfgu_model/         model.json, decoder.safetensors [, backbone.safetensors for a random backbone]
    code/transfgu/          the package that loads it
    input_example.json      serving_input_example.json, requirements.txt, python_env.yaml

Input: a DataFrame with a binary column ``image`` (encoded PNG/JPEG/... bytes; base64 in JSON requests to
``mlflow models serve``). Params: ``as_classes`` (bool, default false). Output, one row per image: ``height``,
``width``, ``label_png`` (base64 of the single-channel label PNG :func:`transfgu.predict.save_label_png` writes),
``pixels`` (JSON list of pixel counts per id) and ``unmatched`` (pixels of clusters without a class).
The metadata records the backbone source, K, the cluster -> class map and the preprocessing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfgu.config import load_config
from transfgu.layout import RunLayout
from transfgu.model_meta import CheckpointError, find_checkpoint, read_model_meta
from transfgu.store.atomic import umask_mode

log = logging.getLogger(__name__)

DATA_DIR = "transfgu_model"
ARTIFACT_NAME = "model"
MODEL_CARD = "MODEL_CARD.md"
#: What loading and running the model imports (pinned to the installed versions when logged).
REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "pyyaml", "pydantic",
                "pyarrow", "scipy")
#: Decoded images larger than this are refused (an MLflow server has no other size limit of its own).
MAX_PIXELS = 40_000_000


class TransFGUPyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(model_input, params) -> DataFrame``."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        from transfgu.predict import encode_label_png, label_histogram

        as_classes = bool((params or {}).get("as_classes", False))
        images = [_decode(x, i) for i, x in enumerate(_image_column(model_input))]
        labels = self.predictor.predict(images, as_classes=as_classes) if images else []
        n_ids = len(self.predictor.class_names) if as_classes else self.predictor.n_clusters
        rows = []
        for lab in labels:
            counts, unmatched = label_histogram(lab, n_ids)
            rows.append({
                "height": int(lab.shape[0]),
                "width": int(lab.shape[1]),
                "label_png": base64.b64encode(encode_label_png(lab, n_ids)).decode("ascii"),
                "pixels": json.dumps(counts.tolist()),
                "unmatched": unmatched,
            })
        return pd.DataFrame(rows, columns=["height", "width", "label_png", "pixels", "unmatched"])


def _image_column(model_input: Any) -> list[Any]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError("model input needs a column 'image' (encoded image bytes); got columns "
                             f"{list(model_input.columns)}")
        return list(model_input["image"])
    if isinstance(model_input, dict) and "image" in model_input:
        v = model_input["image"]
        return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
    if isinstance(model_input, (bytes, str)):
        return [model_input]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise ValueError(f"unsupported model input of type {type(model_input).__name__}: give a DataFrame with an "
                     "'image' column of encoded image bytes")


def _decode(x: Any, i: int) -> np.ndarray:
    from transfgu.data.io import decode_rgb

    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3:
        return x
    if isinstance(x, str):  # base64, as JSON carries binary columns
        try:
            x = base64.b64decode(x, validate=True)
        except ValueError as exc:
            raise ValueError(f"image {i}: a string must be base64-encoded image bytes") from exc
    if not isinstance(x, (bytes, bytearray, memoryview)):
        raise ValueError(f"image {i}: expected encoded image bytes, got {type(x).__name__}")
    return decode_rgb(bytes(x), max_pixels=MAX_PIXELS, name=f"image {i}")


def _load_pyfunc(data_path: str) -> TransFGUPyfunc:
    """Entry point of the pyfunc flavor (``loader_module``): build the predictor from the copied checkpoint.

    ``TRANSFGU_DEVICE`` picks the device (default: CUDA when present).
    """
    from transfgu.predict import load

    return TransFGUPyfunc(load(data_path, device=os.environ.get("TRANSFGU_DEVICE") or None))


# -- saving / logging ---------------------------------------------------------------------------------------------
def example_image_png(height: int = 48, width: int = 64) -> bytes:
    """A small deterministic RGB picture (colour ramps), the model's input example."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def model_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What a user of the registry wants to see without downloading anything (MLmodel ``metadata``)."""
    cfg = meta.get("config") or {}
    return {
        "format": meta.get("format"),
        "backbone_arch": meta["backbone"]["arch"],
        "backbone_weights": str(meta["backbone"].get("weights")),
        "pretrained": bool(meta["backbone"].get("pretrained", False)),
        "n_clusters": int(meta["decoder"]["n_classes"]),
        "k_per_pool": meta.get("k_per_pool"),
        "class_names": list(meta.get("class_names") or []),
        "cluster_to_class": meta.get("cluster_to_class"),
        "preprocessing": {
            "resize": list(meta["eval_size"]), "interpolation": "bilinear, align_corners=False",
            "normalize": "ImageNet mean/std", "output": "logits upsampled bilinearly to the input size, argmax",
        },
        "dataset": (cfg.get("data") or {}).get("name"),
    }


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "height"), ColSpec("long", "width"), ColSpec("string", "label_png"),
                        ColSpec("string", "pixels"), ColSpec("long", "unmatched")]),
        params=ParamSchema([ParamSpec("as_classes", "boolean", False)]),
    )


def requirements() -> list[str]:
    """The model's pip requirements: :data:`REQUIREMENTS` pinned to the installed versions (never ``transfgu``
    itself, which travels as code)."""
    from importlib import metadata

    reqs = []
    for dist in REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _staged_code(tmp: Path) -> Path:
    """A clean copy of the ``transfgu`` package (no caches) to carry as the model's code path."""
    import transfgu

    dst = tmp / "code" / "transfgu"
    # copyfile, not copy2: the copies get the process umask's modes, not the checkout's (MLflow keeps them)
    shutil.copytree(Path(transfgu.__file__).resolve().parent, dst, copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for d in [dst, *(p for p in dst.rglob("*") if p.is_dir())]:
        os.chmod(d, umask_mode(directory=True))  # copytree copies the folders' modes
    return dst


def _flavor_kwargs(checkpoint: Path, tmp: Path) -> dict[str, Any]:
    import pandas as pd

    meta = read_model_meta(checkpoint)
    return {
        "loader_module": __name__,
        "data_path": str(_staged_checkpoint(checkpoint, tmp)),
        "code_paths": [str(_staged_code(tmp))],
        "signature": _signature(),
        "input_example": (pd.DataFrame({"image": [example_image_png()]}), {"as_classes": False}),
        "pip_requirements": requirements(),
        "metadata": model_metadata(meta),
    }


def _staged_checkpoint(checkpoint: Path, tmp: Path) -> Path:
    """Copy the checkpoint under the name the flavor stores it as (``data_path`` keeps its base name); the model
    card goes beside the MLflow model instead."""
    dst = tmp / DATA_DIR
    shutil.copytree(checkpoint, dst, ignore=shutil.ignore_patterns(".*", MODEL_CARD))
    return dst


def save_mlflow_model(checkpoint_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow model of a checkpoint to ``path`` (no tracking server involved)."""
    import mlflow.pyfunc

    ckpt = find_checkpoint(checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(path), **_flavor_kwargs(ckpt, Path(tmp)))
    if (ckpt / MODEL_CARD).is_file():
        shutil.copy2(ckpt / MODEL_CARD, Path(path) / MODEL_CARD)
    return Path(path)


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """The fluent API's tracking URI for a block (``Model.log`` reads it), restored afterwards.

    The rest of the project uses ``MlflowClient`` with explicit URIs; only model logging goes through the fluent
    module state, so it is set for exactly this block.
    """
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri  # None when never set: restoring None keeps the env/default lookup
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(before)


def log_model(tracking_uri: str, run_id: str, checkpoint_dir: str | Path, registered_name: str | None = None,
              name: str = ARTIFACT_NAME) -> Any:
    """Log the checkpoint as an MLflow model of ``run_id`` (shown in the run's and experiment's Models tab),
    registered under ``registered_name`` when given. Returns MLflow's ``ModelInfo`` (``model_uri``, ...).

    The checkpoint's model card (:func:`write_model_card`) is logged beside the model's ``MLmodel`` and becomes the
    description of the registered version. Run metrics at step 0 are copied onto the model by MLflow when it is
    logged: log the evaluation metrics after this, with the model's id and their data set (what the UI lists as the
    model's metrics and "Datasets used").
    """
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.models import Model

    ckpt = find_checkpoint(checkpoint_dir)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Created here rather than by Model.log, which would file it under the fluent API's current experiment
    # (the Default one) instead of the run's.
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, model_type="segmentation",
        params={k: str(v) for k, v in run.data.params.items()},
    )
    with tempfile.TemporaryDirectory() as tmp, _tracking_uri(tracking_uri):
        kw = _flavor_kwargs(ckpt, Path(tmp))
        with _printed_at_debug():  # "Successfully registered model ...": our line below says it in the log format
            info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, name=name, run_id=run_id,
                             model_id=logged.model_id, registered_model_name=registered_name, **kw)
    card = ckpt / MODEL_CARD
    if card.is_file():
        client.log_model_artifact(logged.model_id, str(card))
        if registered_name and info.registered_model_version is not None:
            client.update_model_version(registered_name, str(info.registered_model_version),
                                        description=card.read_text())
    log.info("[mlflow] model logged as %s%s", info.model_uri,
             f", registered as {registered_name!r} version {info.registered_model_version}" if registered_name
             else "")
    return info


@contextlib.contextmanager
def _printed_at_debug() -> Iterator[None]:
    """What MLflow prints with ``print`` (model registration notices, outside its loggers) goes to this module's log
    at DEBUG instead of the console, so a run's console keeps one line format."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for line in (out.getvalue() + err.getvalue()).splitlines():
            if line.strip():
                log.debug("[mlflow] %s", line)


def register_logged_model(tracking_uri: str, model_id: str, name: str) -> str:
    """Register an already logged model (e.g. a sweep's best trial's) under ``name``, with its model card as the
    version's description; returns ``<name>/<version>``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    model = client.get_logged_model(model_id)
    try:
        client.create_registered_model(name)
    except Exception:  # it exists already: add a version, unless this model is one (a resumed sweep)
        client.get_registered_model(name)
        for v in client.search_model_versions(f"name = '{name}'"):
            if model_id in (getattr(v, "model_id", None), v.source.removeprefix("models:/")):
                return f"{name}/{v.version}"
    card = None
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):  # a model logged without a card
        card = Path(client.download_artifacts(model.source_run_id, "model_card/" + MODEL_CARD, tmp)).read_text()
    with _tracking_uri(tracking_uri):  # the registry resolves the models:/ source through the fluent store
        mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=model.source_run_id,
                                         model_id=model_id, description=card)
    log.info("[mlflow] model %s registered as %r version %s", model_id, name, mv.version)
    return f"{name}/{mv.version}"


def default_registered_name(method: str, run_name: str) -> str:
    """``<method>-<run name>`` with the characters a registry refuses in a name replaced by ``-``."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}-{run_name}").strip("-")


def write_model_card(run_dir: str | Path) -> Path | None:
    """``model/MODEL_CARD.md`` of a finished run: what the model is for, the data it saw, its backbone prior, its
    evaluation metrics and its limitations, from the run's own records (config, model.json, eval/metrics.json,
    manifest). None when the run has no model yet."""
    layout = RunLayout(Path(run_dir))
    if not layout.model_json.is_file():
        return None
    meta = read_model_meta(layout.model)
    cfg = load_config(layout.config, drop_other_methods=True) if layout.config.is_file() else None
    metrics = json.loads(layout.metrics.read_text()) if layout.metrics.is_file() else {}
    manifest = json.loads(layout.manifest.read_text()) if layout.manifest.is_file() else {}
    stages = manifest.get("stages", {})
    bb = meta["backbone"]
    prior = bb.get("prior") or ("pretrained" if bb.get("pretrained") else "random")
    prior_text = {
        "random": "**random**: the ViT was never trained. The clusters come from random features; the numbers below "
                  "are a smoke test of the pipeline, not the method's.",
        "pretrained": f"**pretrained** self-supervised weights ({bb.get('weights')}): the method as published.",
    }.get(prior, f"**{prior}**: a backbone trained *with labels* (a development stand-in for the self-supervised "
                 "prior). Its numbers are not the unsupervised method's.")
    lines = [f"# Model card: {meta.get('variant', 'transfgu')} segmentation model of run `{layout.root.name}`", ""]
    lines += ["## Intended use", "",
              "Unsupervised semantic segmentation: each pixel of an image gets one of "
              f"{meta['decoder']['n_classes']} learned clusters (`as_classes` maps clusters to the "
              f"{len(meta.get('class_names') or [])} evaluation classes through the Hungarian matching found on the "
              "labelled validation split). For research and for images like the training data; not for "
              "safety-critical decisions.", ""]
    lines += ["## Data", ""]
    if cfg is not None:
        d = cfg.data
        train_n = (stages.get("extract", {}).get("extra") or {}).get("images")
        lines.append(f"- data set: `{d.name}` at `{d.root}`")
        lines.append(f"- trained on split `{d.train_split}`" + (f" ({train_n} images)" if train_n else "")
                     + ", without labels")
        if metrics.get("n_images"):
            lines.append(f"- evaluated on split `{d.val_split}` ({metrics['n_images']} images, with labels)")
    lines += ["", "## Backbone prior", "", f"- architecture `{bb['arch']}`, weights `{bb.get('weights')}`",
              f"- prior: {prior_text}", ""]
    lines += ["## Metrics", ""]
    if metrics.get("mIoU") is not None:
        lines.append(f"- mIoU {metrics['mIoU']:.4f}, pixel accuracy {metrics.get('pixel_accuracy', float('nan')):.4f}"
                     f" (Hungarian matching of {metrics.get('n_clusters')} clusters to the classes)")
        iou = {k: v for k, v in (metrics.get("per_class_iou") or {}).items() if v is not None}
        if iou:
            lines.append("- per class IoU: " + ", ".join(f"{k} {v:.3f}" for k, v in iou.items()))
    else:
        lines.append("- not evaluated (no labelled validation split)")
    lines += ["", "## Limitations", "",
              "- Cluster ids are arbitrary; class names hold only through the matching on the evaluation split.",
              f"- Input images are resized to {list(meta['eval_size'])} (height, width) for the network: small "
              "objects and thin structures are lost.",
              "- Trained on one data set's domain; other domains need their own run."]
    if prior != "pretrained":
        lines.append("- Not the method's model: see the backbone prior above.")
    out = layout.model / MODEL_CARD
    text = "\n".join(lines) + "\n"
    if not out.is_file() or out.read_text(encoding="utf-8", errors="replace") != text:  # a re-run leaves it as is
        out.write_text(text, encoding="utf-8")
    return out


def resolve_model_dir(uri: str | Path, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """A local checkpoint directory for a run directory, a ``model/`` folder, a saved MLflow model folder, or an
    MLflow URI (``runs:/<id>/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``m-<id>``)."""
    s = str(uri)
    if "://" not in s and not s.startswith(("runs:", "models:")):
        p = Path(s)
        return _data_dir(p) if (p / "MLmodel").is_file() else find_checkpoint(p)
    import mlflow.artifacts

    # runs:/ URIs of MLflow 3 logged models are resolved through the fluent API's store, so set it too.
    with _tracking_uri(tracking_uri) if tracking_uri else contextlib.nullcontext():
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=s, tracking_uri=tracking_uri,
                                                         dst_path=None if dst is None else str(dst)))
    return _data_dir(local)


def _data_dir(model_dir: Path) -> Path:
    """The checkpoint inside a saved MLflow model: the pyfunc flavor's ``data`` entry of its MLmodel file."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise CheckpointError(f"{model_dir} is not an MLflow model (no MLmodel file)")
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    if flavor.get("loader_module") != __name__ or not flavor.get("data"):
        raise CheckpointError(f"{model_dir} is not a transfgu MLflow model (loader_module "
                              f"{flavor.get('loader_module')!r})")
    return find_checkpoint(model_dir / flavor["data"])


def load_pyfunc(uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` (here for symmetry; any MLflow client can call that directly)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


def decode_label_png(b64: str) -> np.ndarray:
    """The int64 id map of a ``label_png`` output cell (255/65535 = unmatched become -1)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    top = 255 if img.mode == "L" else 65535
    arr = np.asarray(img).astype(np.int64)
    return np.where(arr == top, -1, arr)


__all__: Sequence[str] = ("TransFGUPyfunc", "decode_label_png", "default_registered_name", "load_pyfunc", "log_model",
                          "model_metadata", "register_logged_model", "requirements", "resolve_model_dir",
                          "save_mlflow_model", "write_model_card")
