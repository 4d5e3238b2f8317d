"""Bad inputs to the three nodes inside a real ComfyUI: one clear error on the node, nothing overwritten.

Each case queues a small graph over HTTP, as the browser does, and asserts that the prompt ends in an
error whose message is one line naming the problem, and that the embeddings folder and the snapshot
folders are byte-identical afterwards (no word replaced, no partial or temporary file left). Then one
good graph proves the server goes on. Skipped without COMFYUI_PATH, like the rest of tests/comfy.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from .harness import error_message

WORD_A, WORD_B, WORD_NAN, WORD_JUNK, PRECIOUS = "fault-a", "fault-b", "fault-nan", "fault-junk", "fault-precious"


def checkpoint() -> dict:
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}}}


def train(name: str, **extra) -> dict:
    inputs = {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["images", 0], "name": name,
        "init_word": "ball", "vectors": 1, "steps": 2, "learning_rate": 0.02, "batch_size": 1,
        "templates": "object", "seed": 0, "early_stop": 0, "save_every": 0, "resolution": 64,
        "eval_every": 1, "eval_draws": 2, "preview_every": 0, "overwrite": False,
    }
    inputs.update(extra)
    return {
        **checkpoint(),
        "images": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "textinv-disc",
                                                                          "resize_method": "None"}},
        "node": {"class_type": "TextinvTrainEmbedding", "inputs": inputs},
    }


def load(file: str, word: str = "", strength: float = 1.0, node: str = "node") -> dict:
    return {node: {"class_type": "TextinvLoadPseudoWord",
                   "inputs": {"clip": ["ckpt", 1], "embedding_file": file, "word": word, "strength": strength}}}


def load_and_use(file: str, word: str = "") -> dict:
    """Load Pseudo-word feeding a prompt that is saved (a graph needs an output node to run)."""
    return {**checkpoint(), **load(file, word),
            "enc": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["node", 0], "text": "a photo"}},
            "save": {"class_type": "TextinvTestSaveConditioning",
                     "inputs": {"conditioning": ["enc", 0], "name": "node-faults"}}}


def compose(mode: str, name: str, weights: str = "", save: bool = True, second: str = WORD_B) -> dict:
    return {
        **checkpoint(), **load(f"{WORD_A}.safetensors", node="w1"), **load(f"{second}.safetensors", node="w2"),
        "node": {"class_type": "TextinvComposeConcepts", "inputs": {
            "clip": ["ckpt", 1], "embedding_1": ["w1", 1], "embedding_2": ["w2", 1], "mode": mode, "name": name,
            "weights": weights, "save": save, "overwrite": False}},
    }


def tree(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else []:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def words(server):
    """Word files in the embeddings folder: two good ones (1 and 2 vectors), one with NaN, one not a word."""
    from safetensors.torch import save_file

    from textinv_core.embedding_file import save_embedding

    folder = server.embeddings
    save_embedding(folder / f"{WORD_A}.safetensors", {"clip_l": torch.randn(1, 768) * 0.01}, WORD_A, overwrite=True)
    save_embedding(folder / f"{WORD_B}.safetensors", {"clip_l": torch.randn(2, 768) * 0.01}, WORD_B, overwrite=True)
    save_embedding(folder / f"{PRECIOUS}.safetensors", {"clip_l": torch.randn(1, 768)}, PRECIOUS, overwrite=True)
    nan = torch.zeros(1, 768)
    nan[0, 3] = math.nan
    save_file({"emb_params": nan}, str(folder / f"{WORD_NAN}.safetensors"))
    (folder / f"{WORD_JUNK}.safetensors").write_bytes(b"this is not a safetensors file")
    return folder


CASES = {
    # Train Embedding: refused before any model work, nothing written
    "train-name-dotdot": (lambda: train("../escape"), ["'../escape'"]),
    "train-existing-word-without-overwrite": (lambda: train(PRECIOUS), ["already exists", "switch on overwrite"]),
    "train-vectors-beyond-the-prompt": (lambda: train("fault-long", vectors=75), ["vectors 75", "or less"]),
    "train-captions-count": (lambda: train("fault-captions", templates="captions", captions="a {}\nb {}"),
                             ["one caption per image", "2 captions"]),
    "train-resolution-not-a-multiple": (lambda: train("fault-res", resolution=100),
                                        ["resolution 100", "multiple of 8"]),
    # Load Pseudo-word
    "load-nan-word": (lambda: load_and_use(f"{WORD_NAN}.safetensors"), ["non-finite", WORD_NAN]),
    "load-not-a-word": (lambda: load_and_use(f"{WORD_JUNK}.safetensors"), [WORD_JUNK, "not a readable"]),
    "load-bad-word-text": (lambda: load_and_use(f"{WORD_A}.safetensors", "<a>:1.2"), ["':'"]),
    # Compose Concepts
    "compose-save-over-existing": (lambda: compose("blend", PRECIOUS, second=WORD_A),
                                   ["already exists", "switch on overwrite"]),
    "compose-blend-different-counts": (lambda: compose("blend", "fault-blend"), ["same number of vectors"]),
    "compose-weights-not-numbers": (lambda: compose("blend", "fault-w", weights="a, b", second=WORD_A),
                                    ["not numbers"]),
    "compose-weights-count": (lambda: compose("blend", "fault-w2", weights="1, 2, 3", second=WORD_A),
                              ["3 weights for 2"]),
    "compose-load-all-save": (lambda: compose("load all", "fault-all"), ["makes no new word"]),
    "compose-name-dotdot": (lambda: compose("concatenate", "../up"), ["'../up'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_node_input_is_one_clear_error_and_overwrites_nothing(server, words, case):
    make, needles = CASES[case]
    watched = (server.embeddings, server.output / "textinv")
    before = tree(*watched)
    entry = server.wait(server.queue(make()))
    assert entry["status"]["status_str"] == "error", entry["status"]
    message = error_message(entry)
    print(f"{case}: {message}")
    assert message and "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, message
    assert tree(*watched) == before
    assert not list(server.embeddings.glob("*.tmp")) and not list(server.embeddings.glob(".*.tmp"))


def test_the_server_goes_on_after_the_errors(server, words):
    entry = server.run(load_and_use(f"{WORD_A}.safetensors"))
    assert entry["status"]["status_str"] == "success"
