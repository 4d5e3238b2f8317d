"""The web extension in a real headless Chromium against ComfyUI's real front end.

Needs COMFYUI_PATH, the `playwright` Python package and a Chromium binary (Debian: `apt-get install
chromium`; found as `chromium` on PATH or through TEXTINV_CHROMIUM); skipped with the reason
otherwise. With TEXTINV_WRITE_DOCS=1 it refreshes docs/train-embedding.png, and with
TEXTINV_WRITE_WORKFLOWS=1 it rewrites example_workflows/ from the UI's own serialisation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from .harness import REPO
from .workflows import EXAMPLES

MENU_NAMES = {
    "TextinvTrainEmbedding": "Train Embedding (textinv)",
    "TextinvLoadPseudoWord": "Load Pseudo-word (textinv)",
    "TextinvComposeConcepts": "Compose Concepts (textinv)",
}


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")
    chromium = os.environ.get("TEXTINV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no Chromium binary: install one (Debian: apt-get install chromium) or set TEXTINV_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        # only errors raised in this pack's scripts count: ComfyUI 0.3.64's front end itself logs
        # "Cannot read properties of undefined (reading 'id')" at start-up, with or without the pack
        tab.on("pageerror", lambda error: errors.append(f"{error}\n{error.stack}")
               if "/extensions/" in (error.stack or "") else None)
        tab.goto(server.url)
        tab.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        tab.wait_for_timeout(1000)
        tab.keyboard.press("Escape")
        tab.textinv_errors = errors
        yield tab
        browser.close()


# app.loadApiJson in front end 1.27 looks nodes up by string id after giving them numeric ids, so it
# fails on every graph; this does the same (create, set widgets, connect, arrange) with numeric ids.
LOAD_API_GRAPH = """(g) => {
    app.graph.clear();
    const nodes = {};
    for (const [id, data] of Object.entries(g)) {
        const node = LiteGraph.createNode(data.class_type);
        node.id = Number(id);
        app.graph.add(node);
        nodes[id] = node;
    }
    for (const [id, data] of Object.entries(g)) {
        const node = nodes[id];
        for (const [name, value] of Object.entries(data.inputs)) {
            if (Array.isArray(value)) {
                nodes[value[0]].connect(value[1], node, node.inputs.findIndex((i) => i.name === name));
            } else {
                const widget = node.widgets?.find((w) => w.name === name);
                if (widget) widget.value = value;
            }
        }
    }
    app.graph.arrange();
    app.graph.setDirtyCanvas(true, true);
}"""


def open_canvas_menu(page, server) -> None:
    """Right-click the empty canvas until LiteGraph's menu shows (the UI may still be settling)."""
    for _ in range(20):
        page.mouse.click(400, 300, button="right")
        try:
            page.locator(".litemenu-entry", has_text="Add Node").first.wait_for(timeout=1000)
            return
        except Exception:
            page.keyboard.press("Escape")
    page.screenshot(path=str(server.root / "menu-failure.png"))
    raise AssertionError(f"the canvas menu did not open (screenshot: {server.root / 'menu-failure.png'})")


def test_the_three_nodes_can_be_added_from_the_menu(page, server):
    for node_type, title in MENU_NAMES.items():
        page.evaluate("app.graph.clear()")  # the new node lands where the menu opened
        open_canvas_menu(page, server)
        page.locator(".litemenu-entry", has_text="Add Node").first.click()
        page.locator(".litemenu-entry", has_text="textinv").first.click()
        page.locator(".litemenu-entry", has_text=title).first.click()
        page.wait_for_timeout(300)
        types = page.evaluate("app.graph._nodes.map(n => n.type)")
        assert types == [node_type], f"{title} was not added from the menu (graph: {types})"
        if node_type == "TextinvTrainEmbedding":
            chart = page.evaluate("!!document.querySelector('canvas.textinv-loss-chart')")
            assert chart, "Train Embedding has no loss chart widget"
    assert not page.textinv_errors, page.textinv_errors


def test_loss_chart_draws_while_training(page, server):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "LoadImageSetFromFolderNode",
              "inputs": {"folder": "textinv-disc", "resize_method": "None"}},
        "3": {"class_type": "TextinvTrainEmbedding", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "name": "disc-browser",
            "init_word": "ball", "vectors": 1, "steps": 24, "learning_rate": 0.02, "batch_size": 1,
            "templates": "object", "seed": 0, "early_stop": 0, "save_every": 0, "resolution": 64,
            "eval_every": 8, "eval_draws": 4, "preview_every": 8, "captions": "", "overwrite": True}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }
    page.evaluate(LOAD_API_GRAPH, graph)
    page.wait_for_timeout(500)
    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_function(
        "Number(document.querySelector('canvas.textinv-loss-chart')?.dataset.points || 0) >= 10",
        timeout=600_000, polling=500)
    points = int(page.evaluate("document.querySelector('canvas.textinv-loss-chart').dataset.points"))
    assert points >= 10
    drawn = page.evaluate("""() => {
        const c = document.querySelector('canvas.textinv-loss-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 120) blue++;
        return blue;
    }""")
    assert drawn > 20, "the smoothed loss line was not drawn"
    # let it finish so the node also shows the latest preview, then keep a screenshot
    deadline = time.time() + 600
    while time.time() < deadline and not (server.embeddings / "disc-browser.safetensors").exists():
        time.sleep(1)
    page.wait_for_timeout(1500)
    node = page.evaluate("""() => {
        const n = app.graph._nodes.find(n => n.type === 'TextinvTrainEmbedding');
        app.canvas.selectNode(n); app.canvas.fitViewToSelectionAnimated?.({duration: 1});
        return n.id; }""")
    assert node is not None
    page.wait_for_timeout(800)
    shot = server.root / "train-embedding.png"
    page.screenshot(path=str(shot))
    if os.environ.get("TEXTINV_WRITE_DOCS") == "1":
        from PIL import Image

        image = Image.open(shot)
        image.thumbnail((960, 960))
        image = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        image.save(REPO / "docs" / "train-embedding.png", optimize=True)
    assert not page.textinv_errors, page.textinv_errors


def test_example_workflows_open_in_the_ui_without_missing_nodes(page, server):
    folder = REPO / "example_workflows"
    for name, build in EXAMPLES.items():
        path = folder / f"{name}.json"
        if os.environ.get("TEXTINV_WRITE_WORKFLOWS") == "1":
            page.evaluate(LOAD_API_GRAPH, build())
            page.wait_for_timeout(300)
            workflow = page.evaluate("JSON.parse(JSON.stringify(app.graph.serialize()))")
            Path(path).write_text(json.dumps(workflow, indent=2) + "\n")
        workflow = json.loads(Path(path).read_text())
        page.evaluate("w => app.loadGraphData(w, true, true, 'example')", workflow)
        page.wait_for_timeout(500)
        types = page.evaluate("app.graph._nodes.map(n => n.type)")
        missing = page.evaluate("app.graph._nodes.filter(n => n.has_errors || "
                                "!LiteGraph.registered_node_types[n.type]).map(n => n.type)")
        assert not missing, f"{name}: nodes the UI does not know: {missing}"
        assert {"CheckpointLoaderSimple", "KSampler"} <= set(types)
        prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
        classes = {v["class_type"] for v in prompt.values()}
        assert any(c.startswith("Textinv") for c in classes), classes
    assert not page.textinv_errors, page.textinv_errors


def test_prompt_boxes_autocomplete_pseudo_words(page, server):
    (server.embeddings / "disc-autocomplete.safetensors").write_bytes(
        (server.embeddings / "disc-browser.safetensors").read_bytes())
    page.evaluate("app.graph.clear()")
    page.evaluate("""() => {
        const n = LiteGraph.createNode('CLIPTextEncode'); n.pos = [200, 200]; app.graph.add(n);
        const t = LiteGraph.createNode('TextinvTrainEmbedding'); t.pos = [700, 200]; app.graph.add(t);
        t.widgets.find(w => w.name === 'name').value = 'graph-word';
    }""")
    page.wait_for_timeout(800)
    box = page.locator("textarea").first
    box.click()  # focusing a prompt box refreshes the list of embedding files
    page.wait_for_timeout(500)
    page.keyboard.type("a photo of <")
    page.wait_for_selector(".textinv-autocomplete", timeout=10_000)
    offered = page.evaluate("[...document.querySelectorAll('.textinv-autocomplete [data-word]')]"
                            ".map(e => e.dataset.word)")
    assert "<graph-word>" in offered, offered
    page.keyboard.type("disc-au")
    page.wait_for_timeout(300)
    page.keyboard.press("Enter")
    assert box.input_value() == "a photo of <disc-autocomplete>"
