"""``lctfound web`` cost, measured with the real browser (Debian chromium + Playwright).

* start-up: process start → the URL line (server ready), and → the page showing its views;
* memory: RSS of the server process when ready (no CT), after opening a sample CT, and after
  the slice-scroll series;
* slice-scroll latency: a mouse-wheel step over the axial view → the next view frame (the
  ``<img>`` of the view gets a new ``blob:`` source), median / p90 / min / max over ``--scrolls``
  steps, each started from a still view (no frame for ``--quiet`` s), alternating directions so
  the slice stays inside the volume.

The CPU may be shared with other work: the 1-minute load average is recorded before and after.
``--json FILE`` appends one JSON line.

    python benchmarks/bench_web.py                         # lung1 at full resolution (512×512×48)
    python benchmarks/bench_web.py --sample lung2 --scrolls 30 --json benchmarks/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "browser"))
sys.path.insert(0, str(REPO))

from web_harness import CHROMIUM_ARGS, STATE_READY, WebServer, chromium_path, free_port, make_cache  # noqa: E402

FRAME_WATCH = """() => {
  const imgs = [...document.querySelectorAll('img')].filter(i => i.src.startsWith('blob:'));
  const img = imgs.reduce((a, b) => (a.width * a.height >= b.width * b.height ? a : b));
  window.__lctFrames = [];
  new MutationObserver(() => window.__lctFrames.push(performance.now()))
    .observe(img, { attributes: true, attributeFilter: ['src'] });
  const r = img.getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
}"""


def load_average() -> float:
    return os.getloadavg()[0]


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return commit + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(fraction * (len(ordered) - 1))), len(ordered) - 1)]


def measure(args: argparse.Namespace) -> dict:
    from playwright.sync_api import sync_playwright

    from lctfound.io.sample_data import fetch_sample

    sample = fetch_sample()
    result: dict = {"load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        folder = Path(tmp)
        cache = make_cache(folder / "cache", sample.folder, tiny_backbone=False)
        server_args = ["--port", str(free_port()), "--export-dir", str(folder / "exports")]
        if args.downsample > 1:
            server_args += ["--sample-downsample", str(args.downsample)]
        web = WebServer(server_args, cache, folder / "server.log")
        try:
            web.wait_ready(timeout=300)
            result["server_ready_s"] = round(web.ready_s, 2)
            time.sleep(1.0)
            result["rss_ready_mb"] = round(web.rss_mb())
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                     args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                started = time.monotonic()
                page.goto(web.url)
                page.wait_for_function(STATE_READY, timeout=120_000)
                page.wait_for_function("[...document.querySelectorAll('img')].filter(i => i.src.startsWith('blob:'))"
                                       ".length >= 4", timeout=120_000)
                result["page_views_s"] = round(time.monotonic() - started, 2)
                result["startup_to_views_s"] = round(web.ready_s + result["page_views_s"], 2)

                started = time.monotonic()
                page.locator("#lct-sample").click()
                page.locator(f"#lct-sample-{args.sample}").click()
                page.wait_for_function("window.trame.state.get('lct_volume_name') && "
                                       "window.trame.state.get('lct_axial').slices > 0", timeout=300_000)
                result["open_sample_s"] = round(time.monotonic() - started, 2)
                result["volume"] = page.evaluate("window.trame.state.get('lct_volume_summary')")
                time.sleep(2.0)
                result["rss_loaded_mb"] = round(web.rss_mb())

                quiet_ms = int(args.quiet * 1000)
                x, y = page.evaluate(FRAME_WATCH)
                page.mouse.move(x, y)
                latencies = []
                for number in range(args.scrolls + 2):
                    # Start from a still view: the previous step's last frame (RCA sends a fast
                    # interactive frame, then a full-quality one) must not count for this step.
                    page.wait_for_function(f"performance.now() - Math.max(0, ...window.__lctFrames) > {quiet_ms}",
                                           timeout=30_000)
                    before = page.evaluate("performance.now()")
                    page.mouse.wheel(0, 120 if (number // 4) % 2 == 0 else -120)
                    page.wait_for_function(f"window.__lctFrames.some(t => t > {before})", timeout=30_000)
                    frame = page.evaluate(f"window.__lctFrames.find(t => t > {before})")
                    if number >= 2:  # the first steps warm the encoder up
                        latencies.append(frame - before)
                result["scroll_ms"] = {
                    "n": len(latencies), "median": round(statistics.median(latencies), 1),
                    "p90": round(percentile(latencies, 0.9), 1), "min": round(min(latencies), 1),
                    "max": round(max(latencies), 1)}
                result["view_size"] = page.evaluate("window.trame.state.get('lct_axial').size")
                result["rss_after_scroll_mb"] = round(web.rss_mb())
                browser.close()
        finally:
            web.stop()
    result["load_after"] = load_average()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default="lung1", choices=("lung1", "lung2"))
    parser.add_argument("--downsample", type=int, default=1, help="--sample-downsample of the server (default 1)")
    parser.add_argument("--scrolls", type=int, default=20, help="timed wheel steps (default 20)")
    parser.add_argument("--quiet", type=float, default=0.5,
                        help="seconds without a new frame before each wheel step (default 0.5)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--json", type=Path, help="append one JSON line to this file")
    args = parser.parse_args()
    if chromium_path() is None:
        print("error: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args)
    try:
        from turbojpeg import TurboJPEG  # noqa: F401

        encoder = "turbojpeg"
    except Exception:  # noqa: BLE001 - any failure means trame-rca uses its PIL fallback
        encoder = "PIL JPEG (no TurboJPEG)"
    record = {"what": "web", "machine": "2-core CPU" if os.cpu_count() == 2 else f"{os.cpu_count()}-core CPU",
              "date": time.strftime("%Y-%m-%d"), "git_commit": git_commit(),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "python": platform.python_version(), "frame_encoder": encoder,
              "settings": {"sample": args.sample, "downsample": args.downsample, "scrolls": args.scrolls,
                           "viewport": [args.width, args.height]}, **result}
    print(json.dumps(record, indent=2))
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
