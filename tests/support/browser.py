"""A real headless browser for tests: Debian's chromium driven by its chromedriver over the W3C
WebDriver protocol (plain HTTP and JSON, so no client library is needed).

Tests using it skip, saying why, when chromium or chromedriver is not installed
(`apt-get install -y chromium chromium-driver`, or `make browser`).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

W3C_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or the test is skipped with the reason."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs a headless browser: chromium and chromedriver are not installed "
                    "(apt-get install -y chromium chromium-driver, or `make browser`)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Browser:
    """One headless chromium session: open pages, read them, fill and submit forms."""

    def __init__(self, screenshots: Path) -> None:
        chromium, driver = browser_paths()
        self.screenshots = screenshots
        self.port = _free_port()
        self._driver = subprocess.Popen(
            [driver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._profile = tempfile.mkdtemp(prefix="console-chromium-")
        self._wait_ready()
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", f"--user-data-dir={self._profile}",
                     "--window-size=412,915"],  # a phone's viewport
        }}
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{session['sessionId']}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromedriver did not start in 30 s")
            time.sleep(0.1)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {method} {path}: {exc.read().decode()}") from exc

    def open(self, url: str) -> None:
        self._call("POST", f"{self.session}/url", {"url": url})

    def source(self) -> str:
        return str(self._call("GET", f"{self.session}/source"))

    def text(self, css: str) -> str:
        element = self._call("POST", f"{self.session}/element",
                             {"using": "css selector", "value": css})[W3C_ELEMENT]
        return str(self._call("GET", f"{self.session}/element/{element}/text"))

    def type_into(self, css: str, text: str) -> None:
        element = self._call("POST", f"{self.session}/element",
                             {"using": "css selector", "value": css})[W3C_ELEMENT]
        self._call("POST", f"{self.session}/element/{element}/value", {"text": text})

    def click(self, css: str) -> None:
        element = self._call("POST", f"{self.session}/element",
                             {"using": "css selector", "value": css})[W3C_ELEMENT]
        self._call("POST", f"{self.session}/element/{element}/click", {})

    def screenshot(self, name: str) -> Path:
        import base64

        path = self.screenshots / f"{name}.png"
        path.write_bytes(base64.b64decode(self._call("GET", f"{self.session}/screenshot")))
        return path

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self._driver.terminate()
            self._driver.wait(timeout=30)
            shutil.rmtree(self._profile, ignore_errors=True)
