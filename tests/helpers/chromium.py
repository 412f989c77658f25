"""Headless Chromium for the page tests (the Serve page, the report): a minimal DevTools Protocol client and a
``browser`` fixture. Without chromium the tests skip locally and fail under ``CI=true``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """A minimal Chrome DevTools Protocol client (flat sessions over the browser's websocket)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=60)
        self.next_id = 0

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.time() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, session: str, expr: str):
        return self.call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")


@pytest.fixture(name="browser")
def browser(tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "--window-size=1100,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    ws_url = None
    deadline = time.time() + 60
    while time.time() < deadline and ws_url is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        if "DevTools listening on" in line:
            ws_url = line.split("DevTools listening on", 1)[1].strip()
    if ws_url is None:
        proc.kill()
        pytest.fail("chromium did not start its DevTools endpoint")
    tools = DevTools(ws_url)
    yield tools
    tools.ws.close()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def open_page(browser: DevTools, url: str, ready: str = "document.readyState === 'complete'",
              timeout: float = 60) -> str:
    """A new tab on ``url``; returns its session once the JavaScript expression ``ready`` is true."""
    target = browser.call("Target.createTarget", url=url)["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    deadline = time.time() + timeout
    while not browser.evaluate(session, ready):  # the new tab starts on about:blank, then loads the page
        assert time.time() < deadline, f"{url}: not ready ({ready})"
        time.sleep(0.2)
    return session


def element_screenshot(browser: DevTools, session: str, selector: str) -> bytes:
    """PNG of the element ``selector`` (scrolled into view, whole element even beyond the window)."""
    import base64

    browser.evaluate(session, f"document.querySelector({json.dumps(selector)}).scrollIntoView()")
    rect = json.loads(browser.evaluate(session, "JSON.stringify((() => {const r = document.querySelector("
                                                f"{json.dumps(selector)}).getBoundingClientRect(); return "
                                                "{x: r.left + window.scrollX, y: r.top + window.scrollY, "
                                                "width: r.width, height: r.height};})())"))
    clip = {**rect, "scale": 1}
    data = browser.call("Page.captureScreenshot", session, format="png", clip=clip, captureBeyondViewport=True)
    return base64.b64decode(data["data"])
