"""The Serve endpoint under untrusted and heavy input, over real HTTP on 127.0.0.1: large images are decoded reduced
and labelled at full size exactly as the model's functions say, the replicas' memory stays bounded and comes back,
random and mutated requests never get a 5xx (hypothesis), and ``serve run``'s own Ray listens on loopback only."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest
from helpers.ray import http_request, serve_endpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

WORK_PIXELS = 4_000_000  # the default of work_pixels


#: Requests wait longer here: the large images of this module take minutes on the loaded 2-core VM.
_request = partial(http_request, timeout=300)


def _png(h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x // 37) * 29 % 256, (y // 53) * 41 % 256, ((x // 71) + (y // 61)) * 59 % 256], 2)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_run_dir):
    with serve_endpoint(tiny_run_dir, {"model_cpus": "0.5", "api_cpus": "0.25", "max_replicas": "1",
                                       "max_body_mb": "2"},  # the defaults of the memory bounds
                        ready_s=180) as base:
        yield base


def test_large_image_is_labelled_at_full_size_from_the_reduced_decode(endpoint, tiny_run_dir):
    import torch

    from transfgu.data.io import decode_rgb_bounded
    from transfgu.predict import load

    body = _png(2000, 2500)
    status, _, raw = _request(endpoint + "/predict?format=png", body, "image/png")
    assert status == 200
    got = np.asarray(Image.open(io.BytesIO(raw)))
    assert got.shape == (2000, 2500)
    p = load(tiny_run_dir, device="cpu")
    rgb, size = decode_rgb_bounded(body, max_pixels=40_000_000, work_pixels=WORK_PIXELS, min_size=p.eval_size)
    assert rgb.shape[0] < 2000 and size == (2000, 2500)
    from transfgu.predict import label_image

    want = label_image(p.logits(torch.stack([p.preprocess(rgb)]))[0], size, p.label_lut()[0])
    # the replica's batched forward pass may round differently in the last bit: only near-ties can differ
    assert (got != want).mean() < 1e-4


def _replica_rss() -> int:
    from bench.serve_memory import replica_pids, rss

    return sum(rss(replica_pids()).values())


@pytest.mark.slow
def test_concurrent_large_images_hold_bounded_memory_and_give_it_back(endpoint):
    """Regression: 8 concurrent 6000 x 6000 PNGs took ~0.7 GB each in the replicas, held after idle. Here 4 at
    3000 x 3000 (a quarter of the pixels: ~0.7 GB for the four before the fix) must add < 450 MB at the peak (301 MB
    seen once on a fresh clone, so 300 was too tight a line) and come back to idle + 128 MB (77-97 MB measured on the
    2-core VM)."""
    body = _png(3000, 3000)
    assert len(body) < 2 * 1024**2
    assert _request(endpoint + "/predict", body, "image/png")[0] == 200  # first touch of every code path
    time.sleep(3)
    idle = _replica_rss()
    peak = idle
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _replica_rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(_request(endpoint + "/predict", body,
                                                                          "image/png")[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(5)
    stop.set()
    sampler.join()
    mb = 1024**2
    after = _replica_rss()
    deadline = time.time() + 30  # the replicas hand memory back once their requests are done: wait for it, bounded
    while (after - idle) / mb >= 128 and time.time() < deadline:
        time.sleep(1)
        after = _replica_rss()
    assert statuses == [200] * 4
    assert (peak - idle) / mb < 450, (idle / mb, peak / mb, after / mb)
    assert (after - idle) / mb < 128, (idle / mb, peak / mb, after / mb)  # before the fix: ~1 GB held


def _mutated(data: bytes, cuts: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in cuts:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


VALID = _png(40, 50)
bodies = (st.binary(max_size=2000)
          | st.builds(_mutated, st.just(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                          max_size=8))
          | st.builds(lambda n: VALID[:n], st.integers(0, len(VALID))))
ctypes = st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", "", "image/",
                          "multipart/form-data; boundary=x"])
queries = st.dictionaries(st.sampled_from(["format", "classes", "overlay", "x"]),
                          st.text(alphabet="abcjsonpngtrue01%&=", max_size=8), max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=bodies, ctype=ctypes, query=queries)
def test_random_and_mutated_requests_never_get_a_5xx(endpoint, body, ctype, query):
    from urllib.parse import urlencode

    status, _, raw = _request(endpoint + "/predict?" + urlencode(query), body, ctype or None, timeout=120)
    assert status < 500, raw[:300]
    if status >= 400:
        assert "error" in json.loads(raw)


def test_serve_run_starts_ray_on_loopback_only(tiny_run_dir, tmp_path):
    """Regression: `serve run` started a Ray whose GCS, raylet and workers listened on every interface."""
    code = f"""
import sys, os, json, psutil
sys.argv = ["serve", "run", "transfgu.serve:app", "model={tiny_run_dir}"]
from transfgu.serve import app
app({{"model": {str(tiny_run_dir)!r}}})  # what serve run calls first; it keeps the Ray this starts
import ray
node = ray._private.worker._global_node
session = os.path.basename(node.get_session_dir_path())
addrs = set()
for p in psutil.process_iter(["cmdline"]):
    cmd = " ".join(p.info["cmdline"] or [])
    if session in cmd and ("gcs_server" in cmd or "raylet" in cmd):
        addrs |= {{c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}}
print(json.dumps({{"gcs": ray.get_runtime_context().gcs_address, "listen": sorted(addrs)}}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["gcs"].startswith("127.0.0.1:")
    assert info["listen"] and set(info["listen"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, info
