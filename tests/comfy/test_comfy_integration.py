"""The pack inside a real headless ComfyUI: install, train, type the word, compose, cancel, errors.

Every test talks to the server over HTTP only, as the browser does. Models are tiny random
checkpoints in the real SD1.5 / SD2-v / SDXL layouts, so the numbers prove plumbing, not quality.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .harness import FAMILIES, PACK_FOLDER, error_message

NODES = ("TextinvTrainEmbedding", "TextinvLoadPseudoWord", "TextinvComposeConcepts")
WIDTHS = {"sd15": {"emb_params": 768}, "sd2v": {"emb_params": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}


# -- graph pieces (API format) -------------------------------------------------------------------
def checkpoint(family: str) -> dict:
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"tiny-{family}.safetensors"}}}


def train_node(name: str, steps: int = 6, **extra) -> dict:
    inputs = {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["images", 0], "name": name,
        "init_word": "ball", "vectors": 1, "steps": steps, "learning_rate": 0.02, "batch_size": 1,
        "templates": "object", "seed": 0, "early_stop": 0, "save_every": 0, "resolution": 64,
        "eval_every": max(1, steps // 2), "eval_draws": 4, "preview_every": 0, "overwrite": True,
    }
    inputs.update(extra)
    return {
        "images": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "textinv-disc",
                                                                          "resize_method": "None"}},
        "train": {"class_type": "TextinvTrainEmbedding", "inputs": inputs},
    }


def encode(node_id: str, clip, text: str, probe: str | None = None) -> dict:
    graph = {node_id: {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}}}
    if probe:
        graph[f"{node_id}-probe"] = {"class_type": "TextinvTestSaveConditioning",
                                     "inputs": {"conditioning": [node_id, 0], "name": probe}}
    return graph


def load_word(node_id: str, clip, file: str, word: str = "", strength: float = 1.0) -> dict:
    return {node_id: {"class_type": "TextinvLoadPseudoWord",
                      "inputs": {"clip": clip, "embedding_file": file, "word": word, "strength": strength}}}


def sample(prefix: str, positive: str, negative: str, model=("ckpt", 0), vae=("ckpt", 2)) -> dict:
    return {
        f"{prefix}-latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}-k": {"class_type": "KSampler", "inputs": {
            "model": list(model), "positive": [positive, 0], "negative": [negative, 0],
            "latent_image": [f"{prefix}-latent", 0], "seed": 1, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}-decode": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}-k", 0], "vae": list(vae)}},
        f"{prefix}-save": {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}-decode", 0],
                                                                 "filename_prefix": prefix}},
    }


def probe(server, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(server.output / "probe" / f"{name}.safetensors"))


def saved_image(server, entry: dict, node_id: str) -> np.ndarray:
    info = entry["outputs"][node_id]["images"][0]
    path = server.output / info.get("subfolder", "") / info["filename"]
    return np.asarray(Image.open(path), dtype=np.float32)


# -- trained words, once per family --------------------------------------------------------------
_TRAINED: dict[str, dict] = {}


def trained(server, family: str) -> dict:
    if family not in _TRAINED:
        name = f"disc-{family}"
        graph = {**checkpoint(family), **train_node(name)}
        started = time.time()
        entry = server.run(graph, timeout=900)
        _TRAINED[family] = {"name": name, "entry": entry, "seconds": time.time() - started,
                            "ui": entry["outputs"]["train"]["textinv"][0]}
    return _TRAINED[family]


# -- tests ---------------------------------------------------------------------------------------
def test_pack_imports_from_a_renamed_folder_in_under_half_a_second(server):
    log = server.log()
    match = re.search(r"(\d+\.\d+) seconds(?: \(IMPORT FAILED\))?: \S*" + re.escape(PACK_FOLDER), log)
    assert match, f"no import time for {PACK_FOLDER} in the log:\n{log[-3000:]}"
    assert "IMPORT FAILED" not in match.group(0), log[-3000:]
    assert float(match.group(1)) < 0.5


def test_nodes_are_listed_with_a_tooltip_on_every_input(server):
    info = server.get("/object_info")
    for node in NODES:
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["category"] == "textinv"
        for section in ("required", "optional"):
            for input_name, spec in info[node]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{input_name} has no tooltip"


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_word_is_saved_and_the_evaluation_loss_fell(server, family):
    result = trained(server, family)
    path = server.embeddings / f"{result['name']}.safetensors"
    tensors = load_file(str(path))
    assert {k: v.shape[-1] for k, v in tensors.items()} == WIDTHS[family]
    assert all(torch.isfinite(v).all() for v in tensors.values())
    ui = result["ui"]
    print(f"{family}: eval loss {ui['init_eval_loss']:.4f} -> {ui['best_eval_loss']:.4f} "
          f"in {ui['steps_run']} steps, {result['seconds']:.1f} s")
    assert ui["best_eval_loss"] < ui["init_eval_loss"]
    assert server.events("textinv.loss"), "no textinv.loss events reached the websocket"


@pytest.mark.parametrize("family", FAMILIES)
def test_pseudo_word_conditions_exactly_like_the_embedding_file(server, family):
    name = trained(server, family)["name"]
    tag = f"{family}-word"
    graph = {
        **checkpoint(family),
        **load_word("word", ["ckpt", 1], f"{name}.safetensors"),
        **encode("via-word", ["word", 0], f"a photo of <{name}>", f"{tag}-word"),
        **encode("via-file", ["ckpt", 1], f"a photo of embedding:{name}", f"{tag}-file"),
        **encode("weighted-word", ["word", 0], f"a photo of (<{name}>:1.2)", f"{tag}-wword"),
        **encode("weighted-file", ["ckpt", 1], f"a photo of (embedding:{name}:1.2)", f"{tag}-wfile"),
        **encode("other-branch", ["ckpt", 1], f"a photo of <{name}>", f"{tag}-other"),
        **encode("plain", ["ckpt", 1], "a photo of", f"{tag}-plain"),
        **sample(f"{tag}-with", "via-word", "plain"),
        **sample(f"{tag}-without", "plain", "plain"),
    }
    entry = server.run(graph)
    word, file = probe(server, f"{tag}-word"), probe(server, f"{tag}-file")
    assert word.keys() == file.keys()
    for key in word:
        assert torch.equal(word[key], file[key]), key
    wword, wfile = probe(server, f"{tag}-wword"), probe(server, f"{tag}-wfile")
    for key in wword:
        assert torch.equal(wword[key], wfile[key]), key
    assert not torch.equal(word["0.cond"], wword["0.cond"])
    other = probe(server, f"{tag}-other")  # the graph's own CLIP does not know <name>
    assert not torch.equal(other["0.cond"], word["0.cond"])
    with_word = saved_image(server, entry, f"{tag}-with-save")
    without = saved_image(server, entry, f"{tag}-without-save")
    # sampling is deterministic on CPU, so any change comes from the word's conditioning
    changed = float((with_word != without).any(axis=-1).mean())
    diff = np.abs(with_word - without).mean()
    print(f"{family}: <{name}> changed {changed:.0%} of the pixels, mean |diff| {diff:.3f}")
    assert changed > 0.05


def test_cancel_keeps_a_valid_snapshot_and_the_server_goes_on(server):
    name = "disc-cancel"
    graph = {**checkpoint("sd15"), **train_node(name, steps=2000, save_every=2, eval_every=1000)}
    snapshots = server.output / "textinv" / name
    prompt_id = server.queue(graph)
    deadline = time.time() + 300
    while time.time() < deadline and not list(snapshots.glob(f"{name}-step*.safetensors")):
        time.sleep(0.5)
    assert list(snapshots.glob(f"{name}-step*.safetensors")), "no snapshot appeared"
    server.interrupt()
    entry = server.wait(prompt_id, timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, entry["status"]
    last = sorted(snapshots.glob(f"{name}-step*.safetensors"))[-1]
    tensors = load_file(str(last))
    assert tensors["emb_params"].shape == (1, 768) and torch.isfinite(tensors["emb_params"]).all()
    assert not (server.embeddings / f"{name}.safetensors").exists()
    after = server.run({**checkpoint("sd15"), **encode("next", ["ckpt", 1], "a photo", "after-cancel")})
    assert after["status"]["status_str"] == "success"


def test_wrong_family_word_is_an_error_the_user_sees(server):
    name = trained(server, "sd15")["name"]
    graph = {**checkpoint("sdxl"), **load_word("word", ["ckpt", 1], f"{name}.safetensors"),
             **encode("enc", ["word", 0], f"a photo of <{name}>", "wrong-family")}
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "768" in message and "another model family" in message, message


def test_compose_concepts_types_two_words_in_one_prompt_and_blends(server):
    first = trained(server, "sd15")["name"]
    second = "disc-sd15-style"
    server.run({**checkpoint("sd15"), **train_node(second, steps=2, templates="style")})
    graph = {
        **checkpoint("sd15"),
        **load_word("w1", ["ckpt", 1], f"{first}.safetensors"),
        **load_word("w2", ["ckpt", 1], f"{second}.safetensors"),
        "compose": {"class_type": "TextinvComposeConcepts", "inputs": {
            "clip": ["ckpt", 1], "embedding_1": ["w1", 1], "embedding_2": ["w2", 1], "mode": "load all",
            "name": "unused", "weights": "", "save": False}},
        "blend": {"class_type": "TextinvComposeConcepts", "inputs": {
            "clip": ["ckpt", 1], "embedding_1": ["w1", 1], "embedding_2": ["w2", 1], "mode": "blend",
            "name": "disc-blend", "weights": "0.5, 0.5", "save": True}},
        "concat": {"class_type": "TextinvComposeConcepts", "inputs": {
            "clip": ["ckpt", 1], "embedding_1": ["w1", 1], "embedding_2": ["w2", 1], "mode": "concatenate",
            "name": "disc-concat", "weights": "", "save": True}},
        **encode("both", ["compose", 0], f"a photo of <{first}> in the style of <{second}>", "compose-both"),
        **encode("both-files", ["ckpt", 1], f"a photo of embedding:{first} in the style of embedding:{second}",
                 "compose-both-files"),
        **load_word("chained", ["w1", 0], f"{second}.safetensors"),  # Load -> Load: both words
        **encode("both-chained", ["chained", 0], f"a photo of <{first}> in the style of <{second}>",
                 "compose-both-chained"),
        **encode("concat-word", ["concat", 0], "a photo of <disc-concat>", "compose-concat"),
    }
    server.run(graph)
    # The saved file is read in a graph of its own: in the same graph nothing orders that encode after
    # the save (it depends only on the checkpoint); one tier run here failed on that cond mismatch.
    server.run({**checkpoint("sd15"),
                **encode("concat-file", ["ckpt", 1], "a photo of embedding:disc-concat", "compose-concat-file")})
    assert torch.equal(probe(server, "compose-both")["0.cond"], probe(server, "compose-both-files")["0.cond"])
    assert torch.equal(probe(server, "compose-both-chained")["0.cond"], probe(server, "compose-both-files")["0.cond"])
    assert torch.equal(probe(server, "compose-concat")["0.cond"], probe(server, "compose-concat-file")["0.cond"])
    blend = load_file(str(server.embeddings / "disc-blend.safetensors"))["emb_params"]
    a = load_file(str(server.embeddings / f"{first}.safetensors"))["emb_params"]
    b = load_file(str(server.embeddings / f"{second}.safetensors"))["emb_params"]
    assert torch.allclose(blend, 0.5 * a + 0.5 * b)
    assert load_file(str(server.embeddings / "disc-concat.safetensors"))["emb_params"].shape == (2, 768)


def test_example_workflows_queue_over_http(server):
    import json
    import shutil

    from .harness import REPO
    from .workflows import EXAMPLES, ui_to_api

    info = server.get("/object_info")
    small = {
        "CheckpointLoaderSimple": {"ckpt_name": "tiny-sd15.safetensors"},
        "LoadImageSetFromFolderNode": {"folder": "textinv-disc"},
        "TextinvTrainEmbedding": {"steps": 2, "resolution": 64, "eval_every": 2, "eval_draws": 2,
                                  "preview_every": 0, "save_every": 0, "overwrite": True},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
    }
    for name in EXAMPLES:
        workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        prompt = ui_to_api(workflow, info)
        for node in prompt.values():
            node["inputs"].update(small.get(node["class_type"], {}))
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", name
        if name == "textinv-train-from-folder":  # its word feeds the other two examples
            for other in ("my-clock", "my-style"):
                shutil.copy(server.embeddings / "my-cat.safetensors", server.embeddings / f"{other}.safetensors")


def test_training_leaves_the_graphs_model_and_clip_unchanged(server):
    def probe_graph(text: str, tag: str) -> dict:
        return {**checkpoint("sd15"), **encode("enc", ["ckpt", 1], text, f"{tag}-cond"),
                **encode("neg", ["ckpt", 1], "", None), **sample(tag, "enc", "neg")}

    before = server.run(probe_graph("a photo of a ball", "unchanged-before"))
    mask = {"mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}}
    server.run({**checkpoint("sd15"), **mask, **train_node("disc-unchanged", steps=2, mask=["mask", 0])})
    # a trailing space tokenizes the same but is a new cache key, so ComfyUI recomputes everything
    after = server.run(probe_graph("a photo of a ball ", "unchanged-after"))
    cond_before, cond_after = probe(server, "unchanged-before-cond"), probe(server, "unchanged-after-cond")
    assert torch.equal(cond_before["0.cond"], cond_after["0.cond"])
    assert np.array_equal(saved_image(server, before, "unchanged-before-save"),
                          saved_image(server, after, "unchanged-after-save"))
