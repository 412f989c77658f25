"""The Ray Serve application (issue 18 items 3-4): ``serve run transfgu.serve:app model=<run dir | MLflow URI>``.

Two deployments::

    HTTP ──► Api (FastAPI ingress: limits, decoding, JSON/PNG, the page)  ──►  SegmentationModel (batched forward)
             CPU, cheap, many requests at once                                 replicas autoscale with queued requests

Routes:

* ``GET /`` a page that describes the model, segments an uploaded image (again when an option changes) and shows
  the photo, the labels over it at a chosen opacity, and the per-class areas;
* ``POST /predict`` the body is the image file itself (``Content-Type: image/*`` or ``application/octet-stream``),
  or a form upload (``multipart/form-data``, ``curl -F file=@street.jpg``: the first file field). Query:
  ``format=json`` (default: ``label_png`` base64, ``areas`` per id) or ``format=png`` (the label PNG alone, areas in
  the ``X-Areas`` header), ``classes=true`` (matched class ids instead of clusters), ``overlay=true`` (also a JPEG
  overlay and the colour-coded labels as RGBA PNG, base64, in the JSON);
* ``GET /healthz`` 200 with the model's description when a model replica answers, 503 otherwise;
* ``GET /info`` the model's description;
* ``GET /docs`` the API reference, rendered from ``GET /openapi.json`` by a page that needs no network (Swagger UI's
  assets come from a CDN, so FastAPI's own ``/docs`` is blank offline).

Every error, FastAPI's own included (404, 405 for ``GET /predict``), is a JSON ``{"error": ...}`` with the status.
Bad requests get a 4xx and never reach the model: 411/413 for a missing or too large
body (``max_body_mb``, checked on the header and while reading), 400 for an empty body or a file that is not an
image, 413 for an image over ``max_pixels`` (checked on the file header, before decoding), 415 for another content
type, 422 for bad query values or a form without a file. Model replicas only ever see decoded uint8 images.

Labels come from :class:`transfgu.predict.Predictor` (same preprocessing, same logits, same upsampled argmax), so
they equal ``transfgu predict``. ``@serve.batch`` stacks concurrent requests into one forward pass.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (``request: Request``) at runtime,
# and Serve's class-based routes do not resolve string annotations.
import asyncio
import base64
import email.parser
import email.policy
import io
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfgu.mlflow_model import resolve_model_dir
from transfgu.model_meta import find_checkpoint, read_model_meta
from transfgu.viz import colorize, overlay, palette

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("serve_page.html")
DOCS_PAGE = Path(__file__).with_name("serve_docs.html")
DEFAULTS: dict[str, Any] = {
    "device": "auto", "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "min_replicas": 1, "max_replicas": 2,
    "target_ongoing_requests": 4, "model_cpus": 1.0, "api_cpus": 0.25, "api_replicas": 1, "max_body_mb": 16.0,
    "max_pixels": 40_000_000, "tracking_uri": None, "work_pixels": 4_000_000, "max_inflight_pixels": 64_000_000,
    "max_ongoing_requests": None, "api_max_ongoing_requests": 64, "ray_address": None, "host": "127.0.0.1",
}
ACCEPTED_TYPES = ("image/", "application/octet-stream", "multipart/form-data")
#: Above this many output pixels a model replica gives freed heap back to the OS after the batch.
LARGE_PIXELS = 4_000_000


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class SegmentationModel:
    """One checkpoint on one device; concurrent requests are batched into one forward pass."""

    def __init__(self, checkpoint: str, device: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, num_cpus: float = 1.0) -> None:
        import torch

        from transfgu.predict import load

        torch.set_num_threads(max(1, int(num_cpus)))
        self.predictor = load(checkpoint, device=None if device == "auto" else device)
        path = Path(checkpoint)  # the run's name (runs/<name>/model), shown on the page
        self.name = path.parent.name if path.name == "model" else path.name
        self.predict_batch.set_max_batch_size(int(max_batch_size))
        self.predict_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    def info(self) -> dict[str, Any]:
        p = self.predictor
        backbone = p.meta["backbone"]
        return {"n_clusters": p.n_clusters, "class_names": p.class_names, "has_classes": p.cluster_to_class is not None,
                "pretrained": p.pretrained, "eval_size": list(p.eval_size), "device": str(p.device),
                "backbone": backbone["arch"], "prior": backbone.get("prior"),
                "method": p.meta.get("method", "transfgu"), "model": self.name}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[np.ndarray, tuple[int, int], bool]]) -> list[np.ndarray]:
        import torch

        from transfgu.predict import label_image

        x = torch.stack([self.predictor.preprocess(img) for img, _, _ in items])
        logits = self.predictor.logits(x)
        del x
        # The label PNG's array (uint8/uint16) at the original size, in row bands: a 6000 x 6000 request costs its
        # 36 MB of labels here, not gigabytes of upsampled float logits and int64 ids.
        out = [label_image(lg, size, self.predictor.label_lut(as_classes)[0])
               for (_, size, as_classes), lg in zip(items, logits)]
        del logits
        if sum(int(size[0]) * int(size[1]) for _, size, _ in items) > LARGE_PIXELS:
            _release_memory()  # the bands' temporaries: back to the OS, not kept in glibc's arenas
        return out

    async def __call__(self, image: np.ndarray, as_classes: bool = False,
                       size: tuple[int, int] | None = None) -> np.ndarray:
        """Label PNG array (:func:`transfgu.predict.label_image`) of ``image`` at ``size`` (default: its own)."""
        return await self.predict_batch((image, tuple(size or image.shape[:2]), as_classes))


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


api = FastAPI(title="transfgu", description="TransFGU unsupervised semantic segmentation: upload an image, get its "
              "label map and the area of each cluster (or matched class).", docs_url=None, redoc_url=None)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown route, wrong method) in the API's one error shape."""
    if exc.status_code == 405:
        allowed = exc.headers.get("Allow", "") if exc.headers else ""
        message = f"method {request.method} not allowed on {request.url.path}" + (f": use {allowed}" if allowed else "")
    elif exc.status_code == 404:
        message = f"no route {request.url.path}: see /docs"
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()]
    return _error(422, "; ".join(parts) or "invalid request")


_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_ERROR_RESPONSE = {"content": {"application/json": {"schema": _ERROR_SCHEMA}}}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
#: What /predict reads, for the OpenAPI schema (the route reads the raw request itself, so FastAPI cannot infer it).
PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [
        {"name": "format", "in": "query", "required": False,
         "description": "json: label PNG (base64) and areas in a JSON object; png: the label PNG itself, areas in the "
         "X-Areas header", "schema": {"type": "string", "enum": ["json", "png"], "default": "json"}},
        {"name": "classes", "in": "query", "required": False,
         "description": "matched class ids instead of cluster ids (a model with a cluster -> class matching)",
         "schema": {"type": "boolean", "default": False}},
        {"name": "overlay", "in": "query", "required": False,
         "description": "also a JPEG overlay, the colour-coded label map (RGBA PNG) and the palette, in the JSON",
         "schema": {"type": "boolean", "default": False}},
    ],
    "requestBody": {
        "required": True,
        "description": "the image file (PNG, JPEG, WebP, BMP, TIFF, ...) as the body, or a form with one file field",
        "content": {
            "image/*": _BINARY, "application/octet-stream": _BINARY,
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary", "description": "the image file"}}}},
        },
    },
    "responses": {
        "200": {"description": "the label map and the area of each id", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "height": {"type": "integer"}, "width": {"type": "integer"},
                "ids": {"type": "string", "enum": ["clusters", "classes"]},
                "areas": {"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "name": {"type": "string"}, "pixels": {"type": "integer"},
                    "fraction": {"type": "number"}}}},
                "unmatched_pixels": {"type": "integer"}, "unmatched_value": {"type": "integer"},
                "label_png": {"type": "string", "description": "base64 of the label PNG (uint8, uint16 over 254 ids)"},
                "pretrained": {"type": "boolean"},
                "overlay_jpeg": {"type": "string", "description": "base64 JPEG (overlay=true)"},
                "color_png": {"type": "string", "description": "base64 RGBA PNG of the colour-coded labels "
                              "(overlay=true; transparent where no class)"},
                "palette": {"type": "array", "items": {"type": "string"}}}}},
            "image/png": {"schema": {"type": "string", "format": "binary"}}}},
        "400": {"description": "empty body, not a readable image", **_ERROR_RESPONSE},
        "411": {"description": "no body", **_ERROR_RESPONSE},
        "413": {"description": "body or image too large", **_ERROR_RESPONSE},
        "415": {"description": "unsupported content type", **_ERROR_RESPONSE},
        "422": {"description": "bad query value, or a form without a file", **_ERROR_RESPONSE},
    },
}


def form_file(body: bytes, content_type: str) -> bytes:
    """The first file of a ``multipart/form-data`` body (``curl -F file=@x.jpg``): its bytes.

    Parsed with the standard library's MIME parser (no extra dependency); a form without a file field is a 422.
    """
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadRequest(400, "malformed multipart/form-data body (no boundary or no parts)")
    parts = list(msg.iter_parts())
    files = [p for p in parts if p.get_filename() is not None]
    chosen = files[0] if files else next((p for p in parts if p.get_param("name", header="content-disposition")
                                          in ("file", "image")), None)
    if chosen is None:
        raise BadRequest(422, "the form has no file: send the image as a file field, e.g. curl -F file=@street.jpg")
    data = chosen.get_payload(decode=True)
    if not data:
        raise BadRequest(400, "empty file in the form: send an image file (PNG, JPEG, ...)")
    return bytes(data)


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
    """The colour overlay at the decoded image's size (labels sampled to it when the image was decoded reduced)."""
    from PIL import Image

    h, w = image.shape[:2]
    if labels.shape != (h, w):
        rows = np.arange(h) * labels.shape[0] // h
        cols = np.arange(w) * labels.shape[1] // w
        labels = labels[rows[:, None], cols[None, :]]
    top = np.iinfo(labels.dtype).max
    lab = np.where(labels == top, -1, labels.astype(np.int64))
    buf = io.BytesIO()
    Image.fromarray(overlay(image, lab, palette(n_ids))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _histogram(labels: np.ndarray, n_ids: int, rows: int = 256) -> tuple[np.ndarray, int]:
    """Pixels per id of a label PNG array and the unmatched count (the dtype's maximum), a band of rows at a time
    (``np.bincount`` of the whole map would copy it to int64: 8 bytes a pixel)."""
    top = int(np.iinfo(labels.dtype).max)
    counts = np.zeros(top + 1, dtype=np.int64)
    for r0 in range(0, labels.shape[0], rows):
        counts += np.bincount(labels[r0 : r0 + rows].ravel(), minlength=top + 1)
    if counts[n_ids:top].any():
        raise ValueError(f"label ids beyond the {n_ids} ids of the model")
    return counts[:n_ids], int(counts[top])


def _release_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them in its arenas otherwise): after a large request the
    replica's resident memory returns to its idle figure."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PixelBudget:
    """An asyncio semaphore counted in pixels: the large requests a replica holds at once (decoded image, label
    map, encodings) add up to at most ``limit`` pixels; a request larger than ``limit`` runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = max(1, int(limit)), 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self, pixels: int) -> int:
        if self._cond is None:  # created on the replica's event loop
            self._cond = asyncio.Condition()
        n = min(max(0, int(pixels)), self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    async def release(self, n: int) -> None:
        assert self._cond is not None
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


def _color_png(labels: np.ndarray, n_ids: int) -> bytes:
    """The colour-coded labels as RGBA (transparent where the id has no colour): the page lays it over the photo at
    the opacity the user picks; at 0.5 that is :func:`transfgu.viz.overlay`."""
    from PIL import Image

    ok = (labels >= 0) & (labels < n_ids)
    rgba = np.dstack([colorize(np.where(ok, labels, 0), palette(n_ids)), np.where(ok, 255, 0).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


# Everything the ingress class uses must be defined above it: @serve.ingress captures the module's globals when the
# class is decorated.
@serve.deployment
@serve.ingress(api)
class Api:
    """HTTP front: request limits and decoding here, so a bad request never costs a model replica anything."""

    def __init__(self, model: DeploymentHandle, max_body_mb: float = 16.0, max_pixels: int = 40_000_000,
                 work_pixels: int = 4_000_000, max_inflight_pixels: int = 64_000_000) -> None:
        self.model = model
        self.max_bytes = int(float(max_body_mb) * 1024 * 1024)
        self.max_pixels = int(max_pixels)
        self.work_pixels = int(work_pixels)
        self.budget = PixelBudget(max_inflight_pixels)
        self._info: dict[str, Any] | None = None

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    @api.get("/", response_class=HTMLResponse, summary="the upload page")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/docs", response_class=HTMLResponse, summary="this API reference (works offline)")
    async def docs(self) -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz", summary="200 with the model's description when a model replica answers, else 503",
             responses={503: {"description": "no model replica answers", **_ERROR_RESPONSE}})
    async def healthz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as exc:  # no replica answers: not healthy, say why
            return _error(503, f"model replica unavailable: {type(exc).__name__}: {exc}")
        return JSONResponse({"status": "ok", **info})

    @api.get("/info", summary="the model's description (backbone, prior, clusters, class names, eval size)")
    async def info(self) -> JSONResponse:
        return JSONResponse(await self._model_info())

    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not ctype.startswith(ACCEPTED_TYPES):
            raise BadRequest(415, f"unsupported content type {ctype or '(none)'!r}: send the image file itself as "
                             "the body with Content-Type image/<format> or application/octet-stream, or as a form "
                             "upload (multipart/form-data, e.g. curl -F file=@image.jpg)")
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

    def _header_pixels(self, body: bytes) -> int:
        """Pixels the image's header announces (0 when it has none: the decoder then refuses it)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(body)) as img:
                return int(img.size[0]) * int(img.size[1])
        except Exception:  # noqa: BLE001 - unreadable: _decode says why
            return 0

    def _decode(self, body: bytes, min_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        from transfgu.data.io import DecodeError, ImageTooLarge, decode_rgb_bounded

        try:
            return decode_rgb_bounded(body, max_pixels=self.max_pixels, work_pixels=self.work_pixels,
                                      min_size=min_size, name="request body")
        except ImageTooLarge as exc:
            raise BadRequest(413, f"image too large: {exc.reason}") from None
        except DecodeError as exc:
            raise BadRequest(400, f"not a readable image: {exc.reason}") from None

    @api.post("/predict", summary="label an image", openapi_extra=PREDICT_OPENAPI)
    async def predict(self, request: Request) -> Response:
        held = 0
        try:
            fmt = request.query_params.get("format", "json")
            if fmt not in ("json", "png"):
                raise BadRequest(422, f"format={fmt!r}: use json or png")
            as_classes = _flag(request.query_params.get("classes"), "classes")
            want_overlay = _flag(request.query_params.get("overlay"), "overlay")
            body = await self._read_body(request)
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() == "multipart/form-data":
                body = form_file(body, ctype)
            info = await self._model_info()
            if as_classes and not info["has_classes"]:
                raise BadRequest(422, "classes=true needs a model with a cluster -> class matching (an evaluated "
                                 "run); ask for clusters instead")
            # Large images wait their turn here, before anything is decoded (decode, labels and encodings of the
            # requests in flight add up to at most max_inflight_pixels).
            pixels = self._header_pixels(body)
            if pixels > self.work_pixels:
                held = await self.budget.acquire(pixels)
            try:
                return await self._predict(body, fmt, as_classes, want_overlay, info)
            finally:
                del body
                if held:
                    await self.budget.release(held)
                    await asyncio.to_thread(_release_memory)
        except BadRequest as exc:
            return _error(exc.status, exc.message)

    async def _predict(self, body: bytes, fmt: str, as_classes: bool, want_overlay: bool,
                       info: dict[str, Any]) -> Response:
        from transfgu.predict import encode_label_png

        image, size = await asyncio.to_thread(self._decode, body, tuple(info["eval_size"]))
        # The label PNG's array at the original size (uint8, or uint16 beyond 254 ids; the maximum = unmatched).
        labels = await self.model.remote(image, as_classes, size)
        if not want_overlay:
            del image
        names = info["class_names"] if as_classes else [f"cluster {i}" for i in range(info["n_clusters"])]
        n_ids = len(names)
        counts, unmatched = await asyncio.to_thread(_histogram, labels, n_ids)
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
            jpeg = await asyncio.to_thread(_overlay_jpeg, image, labels, n_ids)
            out["overlay_jpeg"] = base64.b64encode(jpeg).decode("ascii")
            out["palette"] = ["#" + "".join(f"{int(v):02x}" for v in c) for c in palette(n_ids)]
            out["color_png"] = base64.b64encode(await asyncio.to_thread(_color_png, labels, n_ids)).decode("ascii")
        return JSONResponse(out)


def build_app(args: Mapping[str, Any]) -> Any:
    """The application for ``serve run transfgu.serve:app model=... [key=value ...]`` (keys: ``DEFAULTS``)."""
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
    read_model_meta(find_checkpoint(ckpt))
    _init_ray(opt)
    model_ongoing = opt["max_ongoing_requests"]
    model = SegmentationModel.options(
        ray_actor_options={"num_cpus": float(opt["model_cpus"]),
                           **({"num_gpus": 1} if str(opt["device"]).startswith("cuda") else {})},
        autoscaling_config={"min_replicas": int(opt["min_replicas"]), "max_replicas": int(opt["max_replicas"]),
                            "target_ongoing_requests": float(opt["target_ongoing_requests"])},
        max_ongoing_requests=int(model_ongoing) if model_ongoing else max(2 * int(opt["max_batch_size"]), 8),
    ).bind(str(ckpt.resolve()), str(opt["device"]), int(opt["max_batch_size"]), float(opt["batch_wait_timeout_s"]),
           float(opt["model_cpus"]))
    return Api.options(num_replicas=int(opt["api_replicas"]), ray_actor_options={"num_cpus": float(opt["api_cpus"])},
                       max_ongoing_requests=int(opt["api_max_ongoing_requests"]),
                       ).bind(model, float(opt["max_body_mb"]), int(opt["max_pixels"]), int(opt["work_pixels"]),
                              int(opt["max_inflight_pixels"]))


def _address_given_to_serve_run() -> bool:
    return any(a in ("--address", "-a") or a.startswith("--address=") for a in sys.argv[1:])


def _init_ray(opt: Mapping[str, Any]) -> None:
    """Start the Ray that ``serve run`` would start, but with every Ray process (GCS, raylet, workers, replicas)
    bound to ``host`` (127.0.0.1 unless told otherwise), or join ``ray_address`` / ``RAY_ADDRESS`` /
    ``serve run --address``. ``serve run`` builds the application before it calls ``ray.init``, and keeps a Ray that
    is already initialised."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or _address_given_to_serve_run():
        return
    from ray.serve._private.constants import SERVE_NAMESPACE

    if opt.get("ray_address"):
        ray.init(address=str(opt["ray_address"]), namespace=SERVE_NAMESPACE)
        return
    host = str(opt.get("host") or "127.0.0.1")
    if host in ("127.0.0.1", "localhost"):
        # Ray otherwise swaps 127.0.0.1 for the machine's outward address (transfgu.distributed.cluster.init_ray).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
        except (ImportError, AttributeError):
            pass
    ray.init(address="local", namespace=SERVE_NAMESPACE, _node_ip_address=host, include_dashboard=False)
