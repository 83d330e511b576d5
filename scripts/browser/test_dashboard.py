"""The demo's dashboard in a real browser (headless Chromium), end to end.

Starts `shardwise demo` on a small load with its dashboard on a free loopback port, opens the
page in Debian's Chromium, waits for live numbers, checks the page against the runner's own
summary and the dead-letter queue, and takes a screenshot that must not be blank.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: file
descriptors 3 and 4, messages separated by NUL bytes), so the test needs nothing beyond the
standard library and the browser: no driver download, no network.

Environment:
  SHARDWISE_BIN_DIR          where `shardwise`, `fraud` and `aggregation` are (the latter two
                             built with their `local` feature, as `make demo` builds them);
                             default target/debug (or $CARGO_TARGET_DIR/debug)
  SHARDWISE_CHROMIUM         the browser (default: chromium, then chromium-headless-shell)
  SHARDWISE_DASHBOARD_SHOT   also save the screenshot here (the README's picture)
  SHARDWISE_DASHBOARD_LOAD   seconds of load (default 8)
"""

import base64
import fcntl
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bin_dir() -> Path:
    if os.environ.get("SHARDWISE_BIN_DIR"):
        return Path(os.environ["SHARDWISE_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(ROOT / "target")
    return Path(target) / "debug"


def chromium() -> str:
    for name in filter(None, [os.environ.get("SHARDWISE_CHROMIUM"), "chromium", "chromium-headless-shell"]):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "no Chromium: install Debian's chromium (apt-get install chromium; .ci/run and "
        "scripts/setup-tools.sh do) or set SHARDWISE_CHROMIUM"
    )


class Browser:
    """One headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1900):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Above 9 so the child's dup2 onto 3 and 4 cannot overwrite one of them.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w)]
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)

        def pipes_at_3_and_4():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [
                chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--hide-scrollbars",
                f"--user-data-dir={profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # close_fds=False: the pipes moved onto 3 and 4 must survive exec; every other
            # descriptor of this process is non-inheritable (PEP 446), so nothing else leaks.
            preexec_fn=pipes_at_3_and_4, close_fds=False,
        )
        for fd in high:
            os.close(fd)
        self._next_id = 0
        self._answers: dict = {}
        self.events: list = []
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.call(method, session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def _read(self):
        buffer = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                with self._lock:
                    self._lock.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                value = json.loads(message)
                with self._lock:
                    if "id" in value:
                        self._answers[value["id"]] = value
                    else:
                        self.events.append(value)
                    self._lock.notify_all()

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        give_up = time.monotonic() + timeout
        with self._lock:
            while self._next_id not in self._answers:
                left = give_up - time.monotonic()
                assert left > 0 and self.process.poll() is None, f"Chromium gave no answer to {method}"
                self._lock.wait(left)
            answer = self._answers.pop(self._next_id)
        assert "error" not in answer, f"{method}: {answer['error']}"
        return answer["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            assert not self.page_errors(), f"script errors on the page: {self.page_errors()}"
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"the page never showed {what} within {timeout:.0f} s")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"])

    def page_errors(self) -> list:
        with self._lock:
            return [
                e["params"]["exceptionDetails"].get("exception", {}).get("description", e["params"])
                for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"
            ]

    def close(self):
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_browser)


def png_pixels(png: bytes):
    """Width, height and rows of RGB(A) pixels of an 8-bit truecolour PNG (what Chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, idat = 8, b""
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        data = png[at + 8:at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", data[:10])
        elif kind == b"IDAT":
            idat += data
        at += 12 + length
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format: depth {depth}, colour type {colour}"
    channels = 3 if colour == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = previous[x]
            c = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


def assert_not_blank(png: bytes):
    width, height, channels, rows = png_pixels(png)
    colours, painted, background = set(), 0, rows[height // 2][:3]
    for row in rows[::4]:
        for x in range(0, width * channels, channels * 4):
            pixel = row[x:x + 3]
            colours.add(pixel)
            painted += pixel != background
    sampled = len(rows[::4]) * len(range(0, width * channels, channels * 4))
    assert len(colours) > 30, f"screenshot has only {len(colours)} colours: blank page?"
    assert painted / sampled > 0.03, f"only {painted / sampled:.1%} of the screenshot differs from its background"


def summary_rows(stdout: str) -> dict:
    """The demo's summary table: function -> {column: value}."""
    lines = stdout.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("function ") and " acked " in line)
    columns = lines[header_at].split()[1:]
    rows = {}
    for line in lines[header_at + 1:]:
        fields = line.split()
        if len(fields) != len(columns) + 1 or not all(f.isdigit() for f in fields[1:]):
            break
        rows[fields[0]] = dict(zip(columns, map(int, fields[1:])))
    return rows


def test_the_demo_dashboard_shows_the_run_live_and_agrees_with_its_summary():
    binaries = bin_dir()
    for name in ("shardwise", "fraud", "aggregation"):
        assert (binaries / name).is_file(), (
            f"{binaries / name} is missing: build with `make local-build` (or set SHARDWISE_BIN_DIR)"
        )
    load_seconds = int(os.environ.get("SHARDWISE_DASHBOARD_LOAD", "8"))
    with tempfile.TemporaryDirectory(prefix="shardwise-dashboard-") as tmp:
        tmp = Path(tmp)
        demo = subprocess.Popen(
            [
                str(binaries / "shardwise"), "demo", "--duration", f"{load_seconds}s", "--rate", "200",
                "--shards", "4", "--window", "3s", "--plain", "2s", "--check",
                "--dashboard", "127.0.0.1:0", "--bin-dir", str(binaries),
                "--template", str(ROOT / "template.yaml"), "--state-dir", str(tmp / "demo"),
            ],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        stderr_lines: list = []
        url_found = threading.Event()
        url: list = []

        def follow_stderr():
            for line in demo.stderr:
                stderr_lines.append(line)
                match = re.match(r"dashboard: (http://127\.0\.0\.1:\d+/)", line)
                if match and not url:
                    url.append(match.group(1))
                    url_found.set()

        threading.Thread(target=follow_stderr, daemon=True).start()
        browser = None
        try:
            assert url_found.wait(60), "the demo printed no dashboard URL:\n" + "".join(stderr_lines)
            browser = Browser(tmp / "chromium-profile")
            browser.call("Page.navigate", {"url": url[0]}, session=True)
            # A script error fails the test at once, rather than as a missing number later.
            browser.wait_for("document.readyState === 'complete'", 20, "the page loaded")

            # Live: every (function, shard) has its row and records are flowing.
            browser.wait_for("document.querySelectorAll('tr.shard-row').length === 8", 45,
                             "a row for each of 4 shards of 2 functions")
            browser.wait_for(
                "document.body.dataset.state === 'running' && "
                "Number(document.querySelector('tr[data-function=fraud] [data-field=rate_in]')"
                ".textContent.replace(/,/g, '')) > 0",
                45, "records/s flowing into fraud while the run is going")
            assert browser.evaluate("document.getElementById('shard-count').textContent") == "4"
            # A dead letter with its decoded payload, and the iterator-age plot with its line.
            browser.wait_for("document.querySelectorAll('tr.dead-letter').length > 0", 45, "a dead letter")
            # A few seconds of history (most of the load, for a longer run: the README's picture).
            ticks = max(3, load_seconds - 4)
            browser.wait_for(f"Number(document.body.dataset.ticks) >= {ticks}", ticks + 20, f"{ticks} seconds of history")
            assert browser.evaluate("document.querySelectorAll('#age .warning-line').length") == 1
            assert browser.evaluate("document.querySelectorAll('#throughput path').length") >= 2
            shot = browser.screenshot()
            assert_not_blank(shot)
            (tmp / "dashboard.png").write_bytes(shot)
            if os.environ.get("SHARDWISE_DASHBOARD_SHOT"):
                Path(os.environ["SHARDWISE_DASHBOARD_SHOT"]).write_bytes(shot)

            # The end: the page says so and keeps the final numbers.
            browser.wait_for("document.body.dataset.state === 'stopped'", 120, "that the runner stopped")
            assert "stopped" in browser.evaluate("document.getElementById('banner').textContent")
            stdout, _ = demo.communicate(timeout=60)
            assert demo.returncode == 0, f"demo failed:\n{stdout}\n{''.join(stderr_lines)}"
            summary = summary_rows(stdout)
            assert set(summary) == {"fraud", "aggregation"}, stdout
            page = browser.evaluate("""Object.fromEntries([...document.querySelectorAll('#functions tbody tr')]
                .map(tr => [tr.dataset.function, Object.fromEntries([...tr.querySelectorAll('[data-field]')]
                .map(td => [td.dataset.field, td.textContent.replace(/,/g, '')]))]))""")
            columns = {"read": "records_in", "acked": "records_out", "invokes": "invokes", "errors": "errors",
                       "retries": "retries", "bisects": "bisects", "on-failure": "discarded",
                       "filtered": "filtered", "windows": "windows_closed"}
            for function, row in summary.items():
                for column, field in columns.items():
                    assert page[function][field] == str(row[column]), (
                        f"{function} {column}: page {page[function][field]}, summary {row[column]}")
            # Per-shard acknowledged counts add up to the function's.
            for function, row in summary.items():
                shards = browser.evaluate(
                    f"[...document.querySelectorAll('tr.shard-row[data-function={function}] [data-field=records_out]')]"
                    ".map(td => Number(td.textContent.replace(/,/g, '')))")
                assert sum(shards) == row["acked"], (function, shards, row)
            dead = int(re.search(r"dead letters:\s+(\d+)", stdout).group(1))
            assert browser.evaluate("document.getElementById('dlq-depth').textContent.replace(/,/g, '')") == str(dead)
            alerts = int(re.search(r"alerts raised:\s+(\d+)", stdout).group(1))
            assert alerts > 0
            assert browser.evaluate("document.getElementById('alert-count').textContent") == f"{alerts:,} raised"
            assert browser.evaluate("document.querySelectorAll('tr.alert').length") > 0
            assert browser.evaluate("document.querySelectorAll('tr.window').length") > 0
            # The payloads shown are the records' own bytes, as the dead-letter queue holds them.
            shown = browser.evaluate("[...document.querySelectorAll('tr.dead-letter td.payload')].map(td => td.textContent)")
            with sqlite3.connect(tmp / "demo" / "local.db") as db:
                bodies = [json.loads(b) for (b,) in db.execute(
                    "SELECT body FROM queue_messages WHERE queue = 'dead-letters'")]
            payloads = {base64.b64decode(b["data"]).decode("utf-8", "replace") for b in bodies if "data" in b}
            assert shown and all(text in payloads for text in shown), (shown[:3], sorted(payloads)[:3])
            assert browser.page_errors() == [], browser.page_errors()
        finally:
            if browser is not None:
                browser.close()
            if demo.poll() is None:
                demo.kill()
                demo.wait()
