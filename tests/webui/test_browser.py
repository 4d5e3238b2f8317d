"""The textinv tab in a real headless Chromium against a web UI's real Gradio front end.

Needs a web UI (WEBUI_*_PATH, as the other web-UI tests), the `playwright` Python package and a
Chromium binary (Debian: `apt-get install chromium`; found as `chromium` on PATH or through
TEXTINV_CHROMIUM); skipped with the reason otherwise. With TEXTINV_WRITE_DOCS=1 it refreshes
docs/webui-textinv-tab.png (from the A1111 run).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .harness import REPO, WebUIServer, training_images, webui_path


@pytest.fixture(scope="module")
def browser_server(ui, checkpoints):
    """The web UI with its Gradio front end (no --nowebui), the pack installed, SD1.5 loaded."""
    root = Path(tempfile.mkdtemp(prefix=f"textinv-webui-browser-{ui}-"))
    srv = WebUIServer(ui, webui_path(ui), root, checkpoints["sd15"], browser=True)
    images = root / "my-disc"
    images.mkdir()
    for i, image in enumerate(training_images(4)):
        image.save(images / f"disc-{i}.png")
    srv.images = images
    srv.start()
    yield srv
    srv.stop()
    if os.environ.get("TEXTINV_KEEP_SERVER_DIR") != "1":
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def page(browser_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")
    chromium = os.environ.get("TEXTINV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium binary: install one (Debian: apt-get install chromium) or set TEXTINV_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(f"{error}\n{error.stack}")
               if "textinv" in (error.stack or "") else None)
        tab.goto(browser_server.url, wait_until="domcontentloaded", timeout=300_000)  # "load" waits on fonts offline
        tab.wait_for_selector("#tabs", timeout=300_000)
        tab.textinv_errors = errors
        yield tab
        browser.close()


def test_the_tab_trains_with_progress_chart_and_preview(page, browser_server, ui):
    page.locator('#tabs button:text-is("textinv")').first.click()  # a button in Gradio 3, a tab in Gradio 4
    page.fill("#textinv_name textarea, #textinv_name input", f"browser-{ui}")
    page.fill("#textinv_init_word textarea, #textinv_init_word input", "disc")
    page.fill("#textinv_steps input", "400")
    page.fill("#textinv_folder textarea, #textinv_folder input", str(browser_server.images))
    page.get_by_text("More settings").click()
    page.fill("#textinv_resolution input", "64")
    page.fill("#textinv_preview_every input", "4")
    page.click("#textinv_train")
    # The web UI's own progress bar (requestProgress puts it just before #textinv_progress), then the
    # loss chart and a preview from /textinv/v1/status.
    page.wait_for_selector("#textinv_output_column .progressDiv .progress", timeout=300_000)
    page.wait_for_selector("#textinv_chart svg.textinv-loss", timeout=300_000)
    page.wait_for_selector("#textinv_chart img.textinv-preview", timeout=300_000)
    page.wait_for_function("document.querySelector('#textinv_output_column .progressDiv .progress')"
                           ".innerText.includes('%')", timeout=300_000)
    shot = browser_server.root / "textinv-tab.png"
    page.screenshot(path=str(shot), full_page=False)
    if os.environ.get("TEXTINV_WRITE_DOCS") == "1" and ui == "a1111":
        shutil.copyfile(shot, REPO / "docs" / "webui-textinv-tab.png")
    # The web UI's interrupt stops the run; the tab says where the snapshot is.
    page.click("#textinv_interrupt")
    page.wait_for_selector("#textinv_outcome .textinv-done", timeout=300_000)
    outcome = page.inner_text("#textinv_outcome")
    assert "Interrupted at step" in outcome or "Trained" in outcome, outcome
    assert page.textinv_errors == []
