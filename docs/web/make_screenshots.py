"""Regenerate the README screenshots of ``lctfound web`` (docs/web/*.png) with the real browser.

Starts ``lctfound web`` on the lung2 sample (shrunk 2× in-plane, slices 16-27), paints the
lesion on two slices, trains and predicts with the built-in backbone, runs a short fine-tuning
in the Train panel and a super-resolution in the Enhance panel, exports, and saves one 1200×800 PNG
per panel (palette-reduced below
300 KB). Takes several minutes on a 2-core CPU.

    .venv/bin/python docs/web/make_screenshots.py
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "Testing" / "browser"))
sys.path.insert(0, str(REPO))

from web_harness import (  # noqa: E402
    CHROMIUM_ARGS,
    STATE_READY,
    WebServer,
    chromium_path,
    free_port,
    make_cache,
    state,
    wait_state,
)

MAX_BYTES = 300_000
SLICES = (3, 7)


def save(page, name: str) -> None:
    from PIL import Image

    page.mouse.move(1190, 790)  # no tooltip in the picture
    page.wait_for_timeout(600)
    image = Image.open(io.BytesIO(page.screenshot(type="png")))
    colours = 256
    while True:
        buffer = io.BytesIO()
        palette = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
        palette.save(buffer, "PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES or colours <= 32:
            break
        colours //= 2
    (HERE / f"{name}.png").write_bytes(buffer.getvalue())
    print(f"{name}.png: {buffer.tell() / 1000:.0f} KB, {colours} colours")


def to_screen(page, i: float, j: float) -> tuple[float, float]:
    axial = state(page, "lct_axial")
    matrix = np.array(axial["ijk_to_xy"]).reshape(4, 4)
    x, y = (matrix @ np.array([i, j, axial["k"], 1.0]))[:2]
    width, height = axial["size"]
    boxes = page.evaluate("[...document.querySelectorAll('img')].filter(i => i.src.startsWith('blob:'))"
                          ".map(i => { const r = i.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })")
    bx, by, bw, bh = max(boxes, key=lambda b: b[2] * b[3])
    return bx + x * bw / width, by + (height - y) * bh / height


def go_to_slice(page, k: int) -> None:
    page.locator("#lct-seg-slice").fill(str(k))
    page.locator("#lct-seg-slice").press("Enter")
    wait_state(page, f"s('lct_axial').k === {k}", 20)


def wait_run(page, prefix: str, before: int, timeout_s: float = 1800) -> None:
    wait_state(page, f"s('{prefix}_runs') > {before} && !s('{prefix}_busy') && "
               f"/^(Finished|Failed|Cancelled)/.test(s('{prefix}_status'))", timeout_s)
    print(prefix, state(page, f"{prefix}_status"))


def main() -> int:
    from playwright.sync_api import sync_playwright

    from lctfound.io.sample_data import fetch_sample
    from lctfound.web.loading import SampleOptions, read_sample

    _, label = read_sample("lung2", SampleOptions(2, 16, 27))
    lesion = label.array > 0
    with tempfile.TemporaryDirectory(prefix="lctfound-shots-") as tmp:
        folder = Path(tmp)
        cache = make_cache(folder / "cache", fetch_sample().folder, tiny_backbone=False)
        web = WebServer(["--port", str(free_port()), "--sample-downsample", "2", "--sample-slices", "16-27",
                         "--export-dir", str(folder / "exports"), "--data-root", str(cache / "sample-data")],
                        cache, folder / "server.log")
        try:
            web.wait_ready(timeout=300)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(web.url)
                page.wait_for_function(STATE_READY, timeout=120_000)
                page.locator("#lct-open-server").click()
                page.locator("#lct-open-dialog").wait_for(state="visible")
                page.wait_for_timeout(800)
                save(page, "open_server_file")
                page.keyboard.press("Escape")
                page.locator("#lct-sample").click()
                page.locator("#lct-sample-lung2").click()
                wait_state(page, "s('lct_axial').slices === 12", 300)
                page.locator("#lct-window-lung").click()
                page.locator("#lct-tool-editor").click()
                page.get_by_role("button", name="Add segment").first.click()
                wait_state(page, "Object.keys(s('lct_voxels')).length === 1", 20)
                page.locator("#lct-tool-segmentation").click()
                page.locator(".v-navigation-drawer button:has(i.mdi-brush)").first.click()
                wait_state(page, "s('SegmentEditorState__active_effect_name').endsWith('Paint')", 20)
                for k in SLICES:
                    go_to_slice(page, k)
                    rows, cols = np.nonzero(lesion[k])
                    for j in (np.percentile(rows, 30), np.percentile(rows, 70)):
                        before = sum(state(page, "lct_voxels").values())
                        page.mouse.move(*to_screen(page, cols.min() + 3.0, j))
                        page.mouse.down()
                        page.mouse.move(*to_screen(page, cols.max() - 3.0, j), steps=10)
                        page.mouse.up()
                        wait_state(page, f"Object.values(s('lct_voxels')).reduce((a, b) => a + b, 0) > {before}", 30)
                page.locator("#lct-tool-editor").click()
                page.wait_for_timeout(1500)
                save(page, "segment_editor")
                page.locator("#lct-tool-segmentation").click()
                page.locator("#lct-seg-new-model").fill("lesion-demo")
                before = state(page, "lct_seg_runs")
                page.locator("#lct-seg-train").click()
                page.locator("#lct-seg-progress").wait_for(state="visible")
                page.wait_for_timeout(3000)
                save(page, "segmentation_training")
                wait_run(page, "lct_seg", before)
                before = state(page, "lct_seg_runs")
                page.locator("#lct-seg-predict").click()
                wait_run(page, "lct_seg", before)
                go_to_slice(page, 5)
                page.wait_for_timeout(2500)
                save(page, "segmentation_result")

                page.locator("#lct-tool-train").click()
                page.locator(".v-select:has(#lct-train-task)").click()
                page.get_by_role("option", name="Fine-tune: segmentation").first.click()
                for field, value in (("max-steps", "30"), ("checkpoint-every", "10"), ("batch-size", "2")):
                    page.locator(f"#lct-train-{field}").fill(value)
                page.wait_for_timeout(1000)
                before = state(page, "lct_train_runs")
                page.locator("#lct-train-start").click()
                wait_run(page, "lct_train", before)
                page.locator("#lct-train-loss").scroll_into_view_if_needed()
                page.wait_for_timeout(1500)
                save(page, "train")

                page.locator("#lct-tool-enhance").click()
                page.locator(".v-select:has(#lct-enh-interpolation)").click()
                page.get_by_role("option", name="Bicubic").first.click()
                page.locator("#lct-enh-factor").fill("2")
                wait_state(page, "s('lct_enh_start').enabled", 30)
                before = state(page, "lct_enh_runs")
                page.locator("#lct-enh-start").click()
                wait_run(page, "lct_enh", before)
                page.locator("#lct-enh-compare-side").click()
                page.wait_for_timeout(2500)
                save(page, "enhance")

                page.locator("#lct-tool-export").click()
                for kind in ("seg-nrrd", "dicom-seg"):
                    with page.expect_download():
                        page.locator(f"#lct-export-{kind}").click()
                page.wait_for_timeout(1000)
                save(page, "export")
                browser.close()
        finally:
            web.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
