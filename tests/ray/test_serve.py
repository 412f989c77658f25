"""Issue 18 items 3-4: the Ray Serve endpoint over real HTTP on 127.0.0.1, good and bad inputs, and its page in a
real headless Chromium (file upload through the DevTools protocol, screenshot checked).

One Serve application for the whole module (tiny random-backbone checkpoint of the session's whole-method run).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers.ray import http_request as _request
from helpers.ray import serve_endpoint
from PIL import Image

from transfgu.data.io import load_rgb

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

MAX_BODY_MB = 1.0
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_run_dir):
    with serve_endpoint(tiny_run_dir, {"model_cpus": "0.5", "api_cpus": "0.25", "max_replicas": "2",
                                       "max_body_mb": str(MAX_BODY_MB), "max_pixels": str(MAX_PIXELS)}) as base:
        yield base


@pytest.fixture(scope="module")
def predictor(tiny_run_dir):
    from transfgu.predict import load

    return load(tiny_run_dir, device="cpu")


def _val_image(camvid: Path, i: int = 0) -> Path:
    return sorted((camvid / "images" / "val").glob("*.jpg"))[i]


def _labels_of(png: bytes) -> np.ndarray:
    arr = np.asarray(Image.open(io.BytesIO(png))).astype(np.int64)
    return np.where(arr == 255, -1, arr)


def test_predict_returns_the_checkpoints_labels_and_areas(endpoint, predictor, camvid):
    path = _val_image(camvid)
    status, headers, body = _request(endpoint + "/predict", path.read_bytes(), "image/jpeg")
    assert status == 200, body
    out = json.loads(body)
    img = load_rgb(path)
    expected = predictor.predict(img)
    got = _labels_of(base64.b64decode(out["label_png"]))
    np.testing.assert_array_equal(got, expected)
    assert (out["height"], out["width"]) == img.shape[:2] and out["ids"] == "clusters" and not out["pretrained"]
    counts = np.bincount(expected.ravel(), minlength=predictor.n_clusters)
    assert {a["id"]: a["pixels"] for a in out["areas"]} == {i: int(c) for i, c in enumerate(counts) if c}
    assert sum(a["fraction"] for a in out["areas"]) == pytest.approx(1.0, abs=1e-4)

    status, headers, body = _request(endpoint + "/predict?format=png&classes=true", path.read_bytes(), "image/jpeg")
    assert status == 200 and headers["content-type"] == "image/png"
    np.testing.assert_array_equal(_labels_of(body), predictor.predict(img, as_classes=True))
    areas = json.loads(headers["x-areas"])
    assert {a["name"] for a in areas} <= set(predictor.class_names)


def test_concurrent_requests_are_batched_and_all_correct(endpoint, predictor, camvid):
    paths = [_val_image(camvid, i) for i in range(4)] * 3
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda p: _request(endpoint + "/predict?format=png", p.read_bytes(), "image/jpeg"),
                                paths))
    for p, (status, _, body) in zip(paths, results):
        assert status == 200
        np.testing.assert_array_equal(_labels_of(body), predictor.predict(load_rgb(p)))


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("data", "ctype", "status", "message"), [
    (b"", "image/png", 400, "empty body"),
    (b"hello, this is text", "text/plain", 415, "unsupported content type"),
    (b'{"image": "x"}', "application/json", 415, "unsupported content type"),
    (b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\nxx\r\n--b--", "multipart/form-data; boundary=b", 422,
     "the form has no file"),
    (b"--b\r\nContent-Disposition: form-data; name=file; filename=x.png\r\nContent-Type: image/png\r\n\r\n"
     b"not an image\r\n--b--\r\n", "multipart/form-data; boundary=b", 400, "not a readable image"),
    (b"\x89PNG\r\n\x1a\n garbage that is not an image", "image/png", 400, "not a readable image"),
    (b"\xff\xd8\xff" + os.urandom(2000), "image/jpeg", 400, "not a readable image"),
    ("big_body", "application/octet-stream", 413, "exceeds the limit"),
    ("many_pixels", "image/png", 413, "image too large"),
])
def test_bad_inputs_get_a_clear_4xx(endpoint, data, ctype, status, message):
    if data == "big_body":
        data = os.urandom(int(MAX_BODY_MB * 1024 * 1024) + 10)
    elif data == "many_pixels":
        data = _png(2000, 1000)  # 2 MP in a few kB: refused on its header, before decoding
        assert len(data) < MAX_BODY_MB * 1024 * 1024
    got, _, body = _request(endpoint + "/predict", data, ctype)
    assert got == status, body
    assert message in json.loads(body)["error"]


def test_bad_query_and_the_service_survives_bad_input(endpoint, predictor, camvid):
    path = _val_image(camvid, 1)
    got, _, body = _request(endpoint + "/predict?format=gif", path.read_bytes(), "image/jpeg")
    assert got == 422 and "format" in json.loads(body)["error"]
    got, _, body = _request(endpoint + "/predict?classes=maybe", path.read_bytes(), "image/jpeg")
    assert got == 422
    for _ in range(3):  # a burst of garbage, then the model still answers
        _request(endpoint + "/predict", os.urandom(5000), "image/jpeg")
    status, _, body = _request(endpoint + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = _request(endpoint + "/predict?format=png", path.read_bytes(), "image/jpeg")
    assert status == 200
    np.testing.assert_array_equal(_labels_of(body), predictor.predict(load_rgb(path)))


def _multipart(field: str, filename: str, data: bytes, ctype: str) -> tuple[bytes, str]:
    boundary = "----transfgu-test-7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_form_upload_equals_the_raw_body(endpoint, predictor, camvid):
    path = _val_image(camvid, 3)
    body, ctype = _multipart("file", path.name, path.read_bytes(), "image/jpeg")
    status, headers, out = _request(endpoint + "/predict?format=png", body, ctype)
    assert status == 200, out
    np.testing.assert_array_equal(_labels_of(out), predictor.predict(load_rgb(path)))
    if shutil.which("curl"):  # the form upload most users try first
        r = subprocess.run(["curl", "-s", "-F", f"file=@{path}", endpoint + "/predict"], capture_output=True,
                           timeout=120)
        got = json.loads(r.stdout)
        np.testing.assert_array_equal(_labels_of(base64.b64decode(got["label_png"])), predictor.predict(load_rgb(path)))


def test_every_error_has_one_shape(endpoint):
    status, headers, body = _request(endpoint + "/predict")  # GET on a POST route: FastAPI's 405, in our shape
    assert status == 405 and json.loads(body) == {"error": "method GET not allowed on /predict: use POST"}
    status, _, body = _request(endpoint + "/no/such/route")
    assert status == 404 and set(json.loads(body)) == {"error"}
    status, _, body = _request(endpoint + "/predict?format=gif", b"x", "image/png")
    assert status == 422 and set(json.loads(body)) == {"error"}


def test_openapi_documents_predict_and_docs_work_offline(endpoint):
    status, _, body = _request(endpoint + "/openapi.json")
    assert status == 200
    op = json.loads(body)["paths"]["/predict"]["post"]
    assert set(op["requestBody"]["content"]) == {"image/*", "application/octet-stream", "multipart/form-data"}
    assert {p["name"] for p in op["parameters"]} == {"format", "classes", "overlay"}
    assert {"200", "400", "413", "415", "422"} <= set(op["responses"])
    status, headers, body = _request(endpoint + "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    # nothing fetched from elsewhere (FastAPI's Swagger page loads its scripts from a CDN: blank offline)
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", body), body[:300]
    status, _, body = _request(endpoint + "/info")
    info = json.loads(body)
    assert info["model"] and info["prior"] == "random" and info["backbone"]


# -- the page in headless Chromium -----------------------------------------------------------------------------------
def _wait_done(browser, session, what: str) -> None:
    deadline = time.time() + 120
    while (state := browser.evaluate(session, "document.body.dataset.state")) not in ("done", "error"):
        assert time.time() < deadline, f"page stuck in state {state} ({what})"
        time.sleep(0.3)
    assert state == "done", browser.evaluate(session, "document.getElementById('status').textContent")


def _shown(browser, session, element: str, h: int, w: int) -> tuple[np.ndarray, bytes]:
    """The pixels the page shows inside ``element``'s 1px border, and the whole screenshot."""
    rect = json.loads(browser.evaluate(
        session, f"JSON.stringify(document.getElementById('{element}').getBoundingClientRect())"))
    shot = base64.b64decode(browser.call("Page.captureScreenshot", session, format="png")["data"])
    page = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.int64)
    return page[int(rect["top"]) + 1:int(rect["top"]) + 1 + h, int(rect["left"]) + 1:int(rect["left"]) + 1 + w], shot


def test_page_uploads_an_image_and_shows_the_overlay(endpoint, browser, predictor, camvid, tmp_path, tiny_run_dir):
    status, headers, body = _request(endpoint + "/")
    assert status == 200 and b'type="file"' in body
    target = browser.call("Target.createTarget", url=endpoint + "/")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    deadline = time.time() + 60
    ready = "document.readyState === 'complete' && document.body.dataset.model === 'ready'"
    while not browser.evaluate(session, ready):  # the new tab starts on about:blank, then loads the page
        assert time.time() < deadline, "the page did not load (or did not describe the model)"
        time.sleep(0.2)
    # the model is described before any upload
    described = browser.evaluate(session, "document.getElementById('model').textContent")
    assert tiny_run_dir.name in described and f"{predictor.n_clusters} clusters" in described, described
    assert "RANDOM" in browser.evaluate(session, "document.getElementById('warning').textContent")
    node = browser.call("Runtime.evaluate", session, expression="document.getElementById('file')")["result"]
    image = _val_image(camvid, 2)
    # what a user's file chooser does: the input gets the file and fires its change event
    browser.call("DOM.setFileInputFiles", session, files=[str(image)], objectId=node["objectId"])
    deadline = time.time() + 120
    while (state := browser.evaluate(session, "document.body.dataset.state")) not in ("done", "error"):
        assert time.time() < deadline, f"page stuck in state {state}"
        time.sleep(0.3)
    assert state == "done", browser.evaluate(session, "document.getElementById('status').textContent")
    rect = browser.evaluate(session, "JSON.stringify(document.getElementById('overlay').getBoundingClientRect())")
    rect = json.loads(rect)
    rows = browser.evaluate(session, "document.querySelectorAll('#areas tr').length")
    assert rows >= 2  # header + at least one cluster
    shot = base64.b64decode(browser.call("Page.captureScreenshot", session, format="png")["data"])
    (tmp_path / "page.png").write_bytes(shot)
    page = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(np.int64)
    x0, y0 = int(rect["left"]) + 2, int(rect["top"]) + 2
    x1, y1 = int(rect["right"]) - 2, int(rect["bottom"]) - 2
    assert x1 - x0 > 100 and y1 - y0 > 100  # the overlay is shown at a real size
    region = page[y0:y1, x0:x1]
    # not blank: many colours, not the white page background
    assert len(np.unique(region.reshape(-1, 3), axis=0)) > 500
    assert region.mean() < 235 and region.std() > 20
    # and it is this image's overlay: the displayed pixels match the blended prediction, not the bare photo
    from transfgu.viz import overlay, palette

    photo = load_rgb(image)
    blended = overlay(photo, predictor.predict(photo), palette(predictor.n_clusters)).astype(np.int64)
    h, w = photo.shape[:2]
    assert (round(rect["width"]) - 2, round(rect["height"]) - 2) == (w, h)  # shown at its natural size (1px border)
    shown = page[int(rect["top"]) + 1:int(rect["top"]) + 1 + h, int(rect["left"]) + 1:int(rect["left"]) + 1 + w]
    to_overlay = np.abs(shown - blended).mean()
    to_photo = np.abs(shown - photo.astype(np.int64)).mean()
    assert to_overlay < 8 and to_photo > 2 * to_overlay, (to_overlay, to_photo)
    if os.environ.get("TRANSFGU_SCREENSHOTS"):  # docs/img/serve_page.png is made this way
        Path(os.environ["TRANSFGU_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["TRANSFGU_SCREENSHOTS"]) / "serve_page.png").write_bytes(shot)

    # original / overlay toggle and opacity: the original view is the photo; full opacity is the bare label colours
    from transfgu.viz import colorize

    browser.evaluate(session, "document.getElementById('show-original').click()")
    shown, _ = _shown(browser, session, "overlay", h, w)
    assert np.abs(shown - photo.astype(np.int64)).mean() < 4
    browser.evaluate(session, "document.getElementById('show-overlay').click(); const r = "
                     "document.getElementById('opacity'); r.value = 100; r.dispatchEvent(new Event('input'))")
    shown, _ = _shown(browser, session, "overlay", h, w)
    colours = colorize(predictor.predict(photo), palette(predictor.n_clusters)).astype(np.int64)
    assert np.abs(shown - colours).mean() < 3

    # ticking "class names" after the upload segments the same image again, with class names
    browser.evaluate(session, "document.getElementById('classes').click()")
    _wait_done(browser, session, "re-render with classes")
    header = browser.evaluate(session, "document.querySelector('#areas tr th:nth-child(2)').textContent")
    assert header == "classes"
    names = browser.evaluate(session, "[...document.querySelectorAll('#areas tr td:nth-child(2)')]"
                             ".map(td => td.textContent)")
    assert names and set(names) <= set(predictor.class_names)
    shown, _ = _shown(browser, session, "overlay", h, w)
    ids = predictor.predict(photo, as_classes=True)
    n = len(predictor.class_names)
    classes = np.where(((ids >= 0) & (ids < n))[..., None], colorize(ids, palette(n)), photo)  # unmatched: the photo
    assert np.abs(shown - classes.astype(np.int64)).mean() < 4


def test_docs_page_renders_the_api_without_network(endpoint, browser):
    target = browser.call("Target.createTarget", url=endpoint + "/docs")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    deadline = time.time() + 60
    while browser.evaluate(session, "document.body && document.body.dataset.state") != "done":
        assert time.time() < deadline, "the docs page did not render"
        time.sleep(0.2)
    text = browser.evaluate(session, "document.body.innerText")
    for needle in ("POST", "/predict", "multipart/form-data", "classes", "overlay", "415", "/healthz"):
        assert needle in text, needle
