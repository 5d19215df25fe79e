"""A minimal headless-Chromium driver over the DevTools protocol, for page tests.

It talks to ``chromium --remote-debugging-pipe`` (JSON messages separated by NUL bytes on
file descriptors 3 and 4), so it needs no websocket library and no network port. Enough
for the pages' tests: open a URL, evaluate JavaScript, send real key events, reload,
allow downloads into a folder, close (which flushes ``localStorage`` to the profile).

:func:`find_chromium` keeps the suite's rule: with ``REIDKIT_REQUIRE_CHROMIUM=1`` a
missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["find_chromium", "require_chromium", "Chromium", "BASE_FLAGS"]

BASE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def require_chromium() -> str:
    """The browser's path; skips the test without one unless REIDKIT_REQUIRE_CHROMIUM=1."""
    exe = find_chromium()
    if exe is None:
        if os.environ.get("REIDKIT_REQUIRE_CHROMIUM") == "1":
            pytest.fail("REIDKIT_REQUIRE_CHROMIUM=1 but no chromium binary was found")
        pytest.skip("chromium not installed")
    return exe


class Chromium:
    """One headless browser with one page. Use as a context manager.

    Args:
        profile: ``--user-data-dir`` (a fixed folder keeps ``localStorage`` between runs).
        download_dir: where downloads are allowed to go (``None``: downloads refused).
        timeout: seconds to wait for any answer.
    """

    def __init__(
        self, profile: Path, download_dir: Path | None = None, timeout: float = 60.0
    ) -> None:
        self.exe = require_chromium()
        self.profile, self.download_dir, self.timeout = profile, download_dir, timeout
        self._id = 0
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    # -------------------------------------------------------------- process + pipe
    def __enter__(self) -> Chromium:
        cmd_r, self._cmd_w = os.pipe()  # we write, chromium reads fd 3
        self._res_r, res_w = os.pipe()  # chromium writes fd 4, we read
        argv = [
            self.exe,
            *BASE_FLAGS,
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            "about:blank",
        ]
        # a tiny launcher puts our pipe ends on fds 3/4, then execs the browser (no
        # preexec_fn, which is not thread-safe; sh cannot name fds above 9)
        launcher = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(cmd_r), str(res_w), *argv],
            pass_fds=(cmd_r, res_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(cmd_r)
        os.close(res_w)
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}
        )["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)
        if self.download_dir is not None:
            self.send(
                "Browser.setDownloadBehavior",
                {
                    "behavior": "allow",
                    "downloadPath": str(self.download_dir),
                    "eventsEnabled": True,
                },
            )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._cmd_w)
            os.close(self._res_r)
            if self.proc.stderr is not None:
                self.proc.stderr.close()

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = os.read(self._res_r, 1 << 16)
            if not chunk:
                err = (
                    self.proc.stderr.read().decode(errors="replace")[-2000:]
                    if self.proc.stderr
                    else ""
                )
                raise RuntimeError(f"chromium closed the DevTools pipe: {err}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(
        self, method: str, params: dict[str, Any] | None = None, session: bool = False
    ) -> dict[str, Any]:
        """Send one command and return its ``result`` (events seen meanwhile are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, predicate=lambda params: True) -> dict[str, Any]:
        """Wait for an event (already seen ones count; they are consumed)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method and predicate(ev.get("params", {})):
                    return self.events.pop(i)["params"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} event within {self.timeout}s")
            self.events.append(self._read_message())

    # ------------------------------------------------------------------- page API
    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises awaited)."""
        res = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"page exception: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied: {expression}")

    def open(
        self,
        url: str,
        ready: str = "document.body && document.body.getAttribute('data-ready') === '1'",
    ) -> None:
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_for(ready)

    def reload(
        self, ready: str = "document.body && document.body.getAttribute('data-ready') === '1'"
    ) -> None:
        self.evaluate("document.body.setAttribute('data-ready', 'reloading')")
        self.send("Page.reload", {"ignoreCache": True}, session=True)
        self.wait_for(ready)

    def press(self, key: str) -> None:
        """A real key press (keydown + keyup) of a printable key or a named one."""
        named = {"Backspace": 8, "Delete": 46, "Enter": 13, "ArrowDown": 40, "ArrowUp": 38}
        code = named.get(key, ord(key.upper()) if len(key) == 1 else 0)
        base = {"key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        down = {"type": "keyDown", **base}
        if len(key) == 1:
            down["text"] = key
        self.send("Input.dispatchKeyEvent", down, session=True)
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **base}, session=True)

    def screenshot(self, path: Path, width: int = 1300, height: int = 900) -> Path:
        import base64

        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
