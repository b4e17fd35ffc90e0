"""Screenshot a web app's page with headless Chromium, driven over the DevTools protocol.

`chromium --screenshot` captures after a fixed virtual time and cannot click: the MLflow and
Prefect UIs load their data after the first paint and open side panels by default. This drives
the same browser over its DevTools websocket (the `websockets` package Prefect already
installs; no new dependency): load the page, wait until it shows a given text, run the given
JavaScript snippets (clicks), then capture. Used by scripts/screenshots.sh; documentation
tooling only, never part of a test.

Usage: python scripts/screenshot.py URL OUT.png --wait TEXT [--js SNIPPET ...] [--size W,H]
       [--storage KEY=VALUE ...]  (localStorage of the URL's origin, set before loading it)
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from websockets.sync.client import connect

# Helpers every snippet can use: click the element with aria-label `t`, else the innermost one
# whose text is `t` (the click bubbles up to whatever handles it: button, tab, link).
HELPERS = """
window.cfspClick = (t) => {
  const all = [...document.querySelectorAll('*')];
  const hit = all.find(e => e.getAttribute('aria-label') === t)
    || all.find(e => e.children.length === 0 && (e.textContent || '').trim() === t);
  if (hit) { hit.click(); return true; }
  return false;
};
"""


class Page:
    """One page target of a running Chromium: numbered DevTools calls, events skipped."""

    def __init__(self, url: str):
        self.ws = connect(url, max_size=64 * 2**20)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=120))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


def launch(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium on a free DevTools port; its page target's websocket URL."""
    proc = subprocess.Popen(
        [
            *(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
            *("--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"),
            *(f"--user-data-dir={profile}", "--no-first-run", "about:blank"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    for _ in range(600):
        if port_file.is_file() and port_file.read_text().strip():
            break
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
        targets = json.load(answer)
    page = next(t for t in targets if t["type"] == "page")
    return proc, page["webSocketDebuggerUrl"]


def _wait(page: Page, probe: str, deadline: float, args) -> None:
    while not page.js(probe):
        if time.time() > deadline:
            raise SystemExit(f"error: {args.url}: no {probe} after {args.timeout}s")
        time.sleep(1)


def capture(page: Page, args) -> bytes:
    width, height = (int(v) for v in args.size.split(","))
    page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
              deviceScaleFactor=1, mobile=False)  # fmt: skip
    page.call("Page.enable")
    deadline = time.time() + args.timeout
    if args.storage:  # the app reads its saved view state (columns, panels) at start
        parts = urlsplit(args.url)
        page.call("Page.navigate", url=f"{parts.scheme}://{parts.netloc}/")
        _wait(page, "document.readyState === 'complete'", deadline, args)
        for item in args.storage:
            key, _, value = item.partition("=")
            page.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
    page.call("Page.navigate", url=args.url)
    probe = f"!!document.body && document.body.innerText.includes({json.dumps(args.wait)})"
    _wait(page, probe, deadline, args)
    page.js(HELPERS)
    for snippet in args.js:
        time.sleep(args.settle)
        page.js(snippet)
    time.sleep(args.settle)
    return base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wait", required=True, help="text the page shows once loaded")
    parser.add_argument("--js", action="append", default=[], help="a snippet to run (repeat)")
    parser.add_argument(
        "--storage", action="append", default=[], help="KEY=VALUE into localStorage first"
    )
    parser.add_argument("--size", default="1400,900", help="viewport W,H")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after each step")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    profiles = tempfile.TemporaryDirectory(prefix="cfsp-chromium-", ignore_cleanup_errors=True)
    with profiles as profile:
        proc, ws_url = launch(args.chromium, Path(profile))
        try:
            png = capture(Page(ws_url), args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    args.out.write_bytes(png)
    print(f"wrote {args.out} ({len(png) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
