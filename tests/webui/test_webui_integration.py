"""textinv as an extension of real web UIs (A1111 1.8, Forge, reForge), driven over HTTP.

Per web UI, on tiny random SD1.5 and SDXL checkpoints: the pack installs and starts without an
error of its own and without moving a pinned package; training through the route writes the word
and registers it at once; a txt2img with the word equals the one after a fresh start that loads
the file the web UI's own way (bit for bit: CPU, fp32, fixed seed); a txt2img without the word is
the same before and after training; Interrupt stops a run and keeps a snapshot; a word of the
wrong family is one clear error. Tests run in file order and share one server per web UI.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from .harness import png_b64, training_images

FAMILY_KEYS = {"sd15": {"emb_params"}, "sdxl": {"clip_l", "clip_g"}}
# Small enough for two CPU cores: SDXL's real-size text encoders dominate a step.
TRAIN = {"init_word": "cat", "resolution": 64, "steps": 4, "eval_every": 2, "eval_draws": 2, "snapshot_every": 2,
         "preview_every": 0}
PROMPT = "a photo of a cat on a table"
FAMILIES = ("sd15", "sdxl")


def word_name(ui: str, family: str) -> str:
    return f"textinv-{ui}-{family}"


def pack_lines(log: str) -> list[str]:
    """Log lines in which the web UI reports a problem with the pack."""
    lines = log.splitlines()
    bad = []
    for i, line in enumerate(lines):
        lower = line.lower()
        if ("textinv" in lower or "textinv-pack" in lower) and any(w in lower for w in ("error", "traceback",
                                                                                       "exception", "failed")):
            bad.append(line)
        if line.startswith("Traceback") and any("textinv" in x for x in lines[i:i + 40]):
            bad.append(line)
    return bad


def test_installs_and_starts_without_an_error_of_its_own(server):
    assert server.installer.returncode == 0, server.installer.stderr
    assert "textinv: installing" not in server.installer.stdout, server.installer.stdout
    assert pack_lines(server.log()) == [], "\n".join(pack_lines(server.log()))
    assert server.get("/textinv/v1/status")["running"] is False


def test_pinned_packages_keep_their_versions(server):
    assert server.pins_after == server.pins_before


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_writes_the_word_and_leaves_the_model_as_it_was(server, checkpoints, family, ui):
    server.switch_checkpoint(checkpoints[family])
    steps = 2 if family == "sdxl" else 4
    before = server.txt2img(PROMPT, steps=steps)
    name = word_name(ui, family)
    literal = server.txt2img(f"a photo of {name} on a table", steps=steps)  # the name as plain text
    status, result = server.post("/textinv/v1/train", dict(TRAIN, name=name,
                                                             images=[png_b64(i) for i in training_images()]))
    assert status == 200, result
    assert result["stopped_reason"] == "completed" and result["steps_run"] == TRAIN["steps"]
    assert result["family"] == {"sd15": "sd1", "sdxl": "sdxl"}[family]
    path = server.embeddings / f"{name}.safetensors"
    assert result["path"] == str(path) and path.is_file()
    vectors = load_file(str(path))
    assert set(vectors) == FAMILY_KEYS[family]
    # The word is registered at once: the next txt2img can use it.
    with_word = server.txt2img(f"a photo of {name} on a table", steps=steps)
    assert with_word != literal, "the same prompt gives the same image with the word registered: it is not used"
    server.results[family] = {"with_word": with_word, "steps": steps}
    assert server.txt2img(PROMPT, steps=steps) == before, "a prompt without the word changed: something leaked"


def test_the_gradient_reaches_every_text_encoder(server, ui):
    """Between the snapshots at steps 2 and 4 every encoder's vectors moved (SDXL: CLIP-L and OpenCLIP-G)."""
    for family in FAMILIES:
        folder = server.data / "textinv" / "snapshots" / word_name(ui, family)
        early = load_file(str(folder / f"{word_name(ui, family)}-step000002.safetensors"))
        late = load_file(str(folder / f"{word_name(ui, family)}-step000004.safetensors"))
        assert set(early) == FAMILY_KEYS[family]
        for key in early:
            assert not (early[key] == late[key]).all(), f"{family}: the {key} vectors never moved"


def offer(server, vectors: dict, name: str):
    outside = server.root / "elsewhere" / f"{name}.safetensors"
    outside.parent.mkdir(exist_ok=True)
    save_file(vectors, str(outside))
    return server.post("/textinv/v1/load", {"path": str(outside)})


def test_a_word_of_the_wrong_family_is_one_clear_error(server, checkpoints, ui):
    server.switch_checkpoint(checkpoints["sd15"])
    status, body = offer(server, {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, "an-sdxl-word")
    assert status == 400, body
    assert "another model family" in body["detail"] and "\n" not in body["detail"]
    assert not (server.embeddings / "an-sdxl-word.safetensors").exists()
    status, body = offer(server, {"emb_params": torch.randn(1, 768)}, "an-sd15-word")
    assert status == 200 and body["family"] == "sd1", body  # the right family registers
    server.switch_checkpoint(checkpoints["sdxl"])
    status, body = offer(server, {"emb_params": torch.randn(1, 768)}, "another-sd15-word")
    assert status == 400 and "another model family" in body["detail"] and "\n" not in body["detail"], body


def test_bad_settings_are_one_line_errors(server):
    status, body = server.post("/textinv/v1/train", {"name": "x/..", "images": [png_b64(training_images(1)[0])]})
    assert status == 400 and "\n" not in body["detail"]
    status, body = server.post("/textinv/v1/train", dict(TRAIN, name="zero-steps", steps=0,
                                                          images=[png_b64(training_images(1)[0])]))
    assert status == 400 and "steps" in body["detail"]


def test_interrupt_stops_the_run_and_keeps_a_snapshot(server, checkpoints, ui):
    server.switch_checkpoint(checkpoints["sd15"])
    name = f"textinv-{ui}-interrupted"
    outcome = {}

    def run():
        outcome["reply"] = server.post("/textinv/v1/train", dict(TRAIN, name=name, steps=400, eval_every=100,
                                                                 snapshot_every=100,
                                                                 images=[png_b64(i) for i in training_images()]))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        job = server.get("/textinv/v1/status")["job"]
        if job and job["name"] == name and job["step"] >= 2:
            break
        time.sleep(0.5)
    status, _ = server.post("/sdapi/v1/interrupt", {})
    assert status == 200
    thread.join(timeout=300)
    status, result = outcome["reply"]
    assert status == 200, result
    assert result["stopped_reason"] == "cancelled" and 2 <= result["steps_run"] < 400
    assert result["snapshot"] and load_file(result["snapshot"])  # a loadable embedding
    assert result["path"] is None and not (server.embeddings / f"{name}.safetensors").exists()


def test_after_a_fresh_start_the_file_gives_the_same_images(server, checkpoints, ui):
    """The web UI loads the written files its own way at start-up; the images with the word are the
    ones the freshly trained, at-once registered word gave (bit for bit). The SDXL word is read
    while SD1.5 is loaded and must work after the switch (reForge needs the pack's reload for that)."""
    server.stop()
    server.start()
    for family in FAMILIES:
        server.switch_checkpoint(checkpoints[family])
        seen = server.results[family]
        again = server.txt2img(f"a photo of {word_name(ui, family)} on a table", steps=seen["steps"])
        assert again == seen["with_word"], f"{family}: the word loaded from its file gives another image"
