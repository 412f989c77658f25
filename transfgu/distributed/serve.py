"""The Ray Serve application (issue 18 items 3-4): ``serve run transfgu.serve:app model=<run dir | MLflow URI>``.

Two deployments::

    HTTP ──► Api (FastAPI ingress: limits, decoding, JSON/PNG, the page)  ──►  SegmentationModel (batched forward)
             CPU, cheap, many requests at once                                 replicas autoscale with queued requests

Routes:

* ``GET /`` a page to upload an image and see the colour overlay and the per-class areas;
* ``POST /predict`` the body is the image file itself (``Content-Type: image/*`` or ``application/octet-stream``).
  Query: ``format=json`` (default: ``label_png`` base64, ``areas`` per id) or ``format=png`` (the label PNG
  alone, areas in the ``X-Areas`` header), ``classes=true`` (matched class ids instead of clusters),
  ``overlay=true`` (also a JPEG overlay, base64, in the JSON);
* ``GET /healthz`` 200 with the model's description when a model replica answers, 503 otherwise;
* ``GET /info`` the model's description.

Bad requests get a 4xx with a JSON ``{"error": ...}`` and never reach the model: 411/413 for a missing or too large
body (``max_body_mb``, checked on the header and while reading), 400 for an empty body or a file that is not an
image, 413 for an image over ``max_pixels`` (checked on the file header, before decoding), 415 for another content
type, 422 for bad query values. Model replicas only ever see decoded uint8 images.

Labels come from :class:`transfgu.predict.Predictor` (same preprocessing, same logits, same upsampled argmax), so
they equal ``transfgu predict``. ``@serve.batch`` stacks concurrent requests into one forward pass.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (``request: Request``) at runtime,
# and Serve's class-based routes do not resolve string annotations.
import asyncio
import base64
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("serve_page.html")
DEFAULTS: dict[str, Any] = {
    "device": "auto", "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "min_replicas": 1, "max_replicas": 2,
    "target_ongoing_requests": 4, "model_cpus": 1.0, "api_cpus": 0.25, "api_replicas": 1, "max_body_mb": 16.0,
    "max_pixels": 40_000_000, "tracking_uri": None,
}
ACCEPTED_TYPES = ("image/", "application/octet-stream")


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class SegmentationModel:
    """One checkpoint on one device; concurrent requests are batched into one forward pass."""

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, num_cpus: float = 1.0) -> None:
        import torch

        from transfgu.predict import load

        torch.set_num_threads(max(1, int(num_cpus)))
        self.predictor = load(checkpoint, device=None if device == "auto" else device)
        self.predict_batch.set_max_batch_size(int(max_batch_size))
        self.predict_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    def info(self) -> dict[str, Any]:
        p = self.predictor
        return {"n_clusters": p.n_clusters, "class_names": p.class_names, "has_classes": p.cluster_to_class is not None,
                "pretrained": p.pretrained, "eval_size": list(p.eval_size), "device": str(p.device),
                "backbone": p.meta["backbone"]["arch"]}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[np.ndarray, bool]]) -> list[np.ndarray]:
        import torch

        x = torch.stack([self.predictor.preprocess(img) for img, _ in items])
        logits = self.predictor.logits(x)
        return [self.predictor.labels_from_logits(lg[None], [img.shape[:2]], as_classes)[0]
                for (img, as_classes), lg in zip(items, logits)]

    async def __call__(self, image: np.ndarray, as_classes: bool = False) -> np.ndarray:
        return await self.predict_batch((image, as_classes))


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


api = FastAPI(title="transfgu", description="TransFGU unsupervised semantic segmentation")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _flag(value: str | None, name: str) -> bool:
    if value is None or value == "":
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise BadRequest(422, f"query parameter {name}={value!r}: use true or false")


def _overlay_jpeg(image: np.ndarray, labels: np.ndarray, n_ids: int) -> bytes:
    from PIL import Image

    from transfgu.viz import overlay, palette

    buf = io.BytesIO()
    Image.fromarray(overlay(image, labels, palette(n_ids))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Everything the ingress class uses must be defined above it: @serve.ingress captures the module's globals when the
# class is decorated.
@serve.deployment
@serve.ingress(api)
class Api:
    """HTTP front: request limits and decoding here, so a bad request never costs a model replica anything."""

    def __init__(self, model: DeploymentHandle, max_body_mb: float = 16.0, max_pixels: int = 40_000_000) -> None:
        self.model = model
        self.max_bytes = int(float(max_body_mb) * 1024 * 1024)
        self.max_pixels = int(max_pixels)
        self._info: dict[str, Any] | None = None

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as exc:  # no replica answers: not healthy, say why
            return _error(503, f"model replica unavailable: {type(exc).__name__}: {exc}")
        return JSONResponse({"status": "ok", **info})

    @api.get("/info")
    async def info(self) -> JSONResponse:
        return JSONResponse(await self._model_info())

    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not ctype.startswith(ACCEPTED_TYPES):
            raise BadRequest(415, f"unsupported content type {ctype or '(none)'!r}: send the image file itself as "
                             "the body with Content-Type image/<format> or application/octet-stream")
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise BadRequest(400, f"bad Content-Length {length!r}") from None
            if n > self.max_bytes:
                raise BadRequest(413, f"body of {n} bytes exceeds the limit of {self.max_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: chunked bodies have no Content-Length
            size += len(chunk)
            if size > self.max_bytes:
                raise BadRequest(413, f"body exceeds the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise BadRequest(400, "empty body: send an image file (PNG, JPEG, ...) as the request body")
        return body

    def _decode(self, body: bytes) -> np.ndarray:
        from transfgu.data.io import DecodeError, ImageTooLarge, decode_rgb

        try:
            return decode_rgb(body, max_pixels=self.max_pixels, name="request body")
        except ImageTooLarge as exc:
            raise BadRequest(413, f"image too large: {exc.reason}") from None
        except DecodeError as exc:
            raise BadRequest(400, f"not a readable image: {exc.reason}") from None

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        from transfgu.predict import encode_label_png, label_histogram

        try:
            fmt = request.query_params.get("format", "json")
            if fmt not in ("json", "png"):
                raise BadRequest(422, f"format={fmt!r}: use json or png")
            as_classes = _flag(request.query_params.get("classes"), "classes")
            want_overlay = _flag(request.query_params.get("overlay"), "overlay")
            body = await self._read_body(request)
            image = await asyncio.to_thread(self._decode, body)
            info = await self._model_info()
            if as_classes and not info["has_classes"]:
                raise BadRequest(422, "classes=true needs a model with a cluster -> class matching (an evaluated "
                                 "run); ask for clusters instead")
        except BadRequest as exc:
            return _error(exc.status, exc.message)
        labels = await self.model.remote(image, as_classes)
        names = info["class_names"] if as_classes else [f"cluster {i}" for i in range(info["n_clusters"])]
        n_ids = len(names)
        counts, unmatched = label_histogram(labels, n_ids)
        total = int(labels.size)
        areas = [{"id": i, "name": names[i], "pixels": int(c), "fraction": round(int(c) / total, 6)}
                 for i, c in enumerate(counts) if c]
        png = await asyncio.to_thread(encode_label_png, labels, n_ids)
        if fmt == "png":
            return Response(png, media_type="image/png",
                            headers={"X-Areas": json.dumps(areas), "X-Unmatched-Pixels": str(unmatched)})
        out: dict[str, Any] = {
            "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "ids": "classes" if as_classes else "clusters",
            "areas": areas, "unmatched_pixels": unmatched, "unmatched_value": (255 if n_ids < 255 else 65535),
            "label_png": base64.b64encode(png).decode("ascii"), "pretrained": info["pretrained"],
        }
        if want_overlay:
            from transfgu.viz import palette

            jpeg = await asyncio.to_thread(_overlay_jpeg, image, labels, n_ids)
            out["overlay_jpeg"] = base64.b64encode(jpeg).decode("ascii")
            out["palette"] = ["#" + "".join(f"{int(v):02x}" for v in c) for c in palette(n_ids)]
        return JSONResponse(out)


def build_app(args: Mapping[str, Any]) -> Any:
    """The application for ``serve run transfgu.serve:app model=... [key=value ...]`` (keys: ``DEFAULTS``)."""
    from transfgu.mlflow_model import resolve_model_dir

    args = dict(args)
    if not args.get("model"):
        raise ValueError("give the model: serve run transfgu.serve:app model=<run dir | model dir | runs:/<id>/model "
                         "| models:/<name>/<version>>")
    unknown = set(args) - set(DEFAULTS) - {"model"}
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; known: model, {', '.join(sorted(DEFAULTS))}")
    opt = {**DEFAULTS, **{k: v for k, v in args.items() if k != "model"}}
    # Resolved (downloaded from MLflow if need be) once here, where `serve run` runs; replicas get a local path.
    ckpt = resolve_model_dir(str(args["model"]), tracking_uri=opt["tracking_uri"])
    # Validated here, where `serve run` runs, so a bad checkpoint is one line and not a replica crash loop.
    from transfgu.checkpoint import read_model_meta
    from transfgu.predict import find_checkpoint

    read_model_meta(find_checkpoint(ckpt))
    model = SegmentationModel.options(
        ray_actor_options={"num_cpus": float(opt["model_cpus"]),
                           **({"num_gpus": 1} if str(opt["device"]).startswith("cuda") else {})},
        autoscaling_config={"min_replicas": int(opt["min_replicas"]), "max_replicas": int(opt["max_replicas"]),
                            "target_ongoing_requests": float(opt["target_ongoing_requests"])},
        max_ongoing_requests=max(2 * int(opt["max_batch_size"]), 8),
    ).bind(str(ckpt.resolve()), str(opt["device"]), int(opt["max_batch_size"]), float(opt["batch_wait_timeout_s"]),
           float(opt["model_cpus"]))
    return Api.options(num_replicas=int(opt["api_replicas"]), ray_actor_options={"num_cpus": float(opt["api_cpus"])}
                       ).bind(model, float(opt["max_body_mb"]), int(opt["max_pixels"]))
