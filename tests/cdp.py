"""Headless Chromium driven over the DevTools protocol, for the dashboard test.

Just enough of CDP to open a page, evaluate JavaScript and take a screenshot;
websocket-client carries it. Chromium is Debian's (/usr/bin/chromium), started
with the flags this machine needs (no background networking, no sandbox as root).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import websocket
from conftest import LOOPBACK, free_port, wait_for


class Chromium:
    def __init__(self, executable: str, profile: Path) -> None:
        self.port = free_port()
        # Chromium makes its singleton socket's folder in TMPDIR and, killed, leaves it
        # there: a folder of its own, removed by close(). Short, for the socket's path.
        self.tmpdir = tempfile.mkdtemp(prefix="chromium-")
        self.proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,720",
                f"--user-data-dir={profile}",
                f"--remote-debugging-address={LOOPBACK}",
                f"--remote-debugging-port={self.port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": self.tmpdir},
        )
        self._ids = itertools.count(1)
        try:
            page = wait_for(self._page_target, timeout=30, interval=0.1, what="Chromium's DevTools endpoint")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        except BaseException:
            self._stop()
            raise

    def _page_target(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/json/list", timeout=2) as response:
                targets = json.load(response)
        except OSError:
            return None
        return next((t for t in targets if t.get("type") == "page"), None)

    def call(self, method: str, **params: Any) -> dict:
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
