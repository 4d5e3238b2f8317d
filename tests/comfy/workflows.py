"""The example workflows (example_workflows/*.json) and a UI -> API converter to queue them over HTTP.

The examples are written by the real front end: test_browser.py loads each API graph below into
ComfyUI's UI and saves `app.graph.serialize()` when TEXTINV_WRITE_WORKFLOWS=1, so the committed
files are exactly what the UI itself produces and opens. `ui_to_api` turns such a file back into
the API format (the way the front end's graphToPrompt does for these plain graphs), so the
integration tests queue the committed files themselves.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}

CKPT = "v1-5-pruned-emaonly.safetensors"


def _sampler(positive: str, negative: str, model: str = "1") -> dict:
    return {
        "20": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "21": {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "positive": [positive, 0], "negative": [negative, 0], "latent_image": ["20", 0],
            "seed": 0, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "22": {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["1", 2]}},
        "23": {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": "textinv"}},
    }


def train_from_folder() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "my-cat", "resize_method": "None"}},
        "3": {"class_type": "TextinvTrainEmbedding", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "name": "my-cat",
            "init_word": "cat", "vectors": 1, "steps": 500, "learning_rate": 0.005, "batch_size": 1,
            "templates": "object", "seed": 0, "early_stop": 4, "save_every": 100, "resolution": 512,
            "eval_every": 50, "eval_draws": 16, "preview_every": 100, "captions": "", "overwrite": False}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0],
                                                          "text": "a watercolor painting of <my-cat>"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "blurry, low quality"}},
        **_sampler("10", "11"),
    }


def use_word() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "TextinvLoadPseudoWord", "inputs": {
            "clip": ["1", 1], "embedding_file": "my-cat.safetensors", "word": "", "strength": 1.0}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0],
                                                          "text": "a photo of (<my-cat>:1.1) on a beach"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry, low quality"}},
        **_sampler("10", "11"),
    }


def compose_two_words() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "TextinvLoadPseudoWord", "inputs": {
            "clip": ["1", 1], "embedding_file": "my-clock.safetensors", "word": "", "strength": 1.0}},
        "3": {"class_type": "TextinvLoadPseudoWord", "inputs": {
            "clip": ["1", 1], "embedding_file": "my-style.safetensors", "word": "", "strength": 1.0}},
        "4": {"class_type": "TextinvComposeConcepts", "inputs": {
            "clip": ["1", 1], "embedding_1": ["2", 1], "embedding_2": ["3", 1], "mode": "load all",
            "name": "clock-style", "weights": "", "save": False}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 0],
                                                          "text": "a photo of <my-clock> in the style of <my-style>"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 0], "text": "blurry, low quality"}},
        **_sampler("10", "11"),
    }


EXAMPLES = {
    "textinv-train-from-folder": train_from_folder,
    "textinv-use-word": use_word,
    "textinv-compose-two-words": compose_two_words,
}


def _widget_names(spec: dict) -> list[tuple[str, bool]]:
    """(input name, has a control_after_generate value after it) for each widget, in UI order."""
    names = []
    for section in ("required", "optional"):
        for name, value in spec["input"].get(section, {}).items():
            kind = value[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                options = value[1] if len(value) > 1 else {}
                control = kind == "INT" and options.get("control_after_generate", name in SEED_NAMES)
                names.append((name, bool(control)))
    order = spec.get("input_order")
    if order:
        ordered = order.get("required", []) + order.get("optional", [])
        rank = {n: i for i, n in enumerate(ordered)}
        names.sort(key=lambda item: rank.get(item[0], len(rank)))
    return names


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt of a UI workflow without groups/subgraphs (the examples' shape)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        spec = object_info[node["type"]]
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            inputs.update(node["widgets_values"])
        else:
            i = 0
            for name, control in _widget_names(spec):
                if i >= len(values):
                    break
                inputs[name] = values[i]
                i += 2 if control else 1
        for slot in node.get("inputs", []):
            link = slot.get("link")
            if link is not None:
                _, origin, origin_slot = links[link][:3]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
