"""Compose Concepts: several learned words in one CLIP, a weighted blend of words into a new word,
or their concatenation into one multi-vector word; optionally saved as an embedding file.

"a photo of <clock> in the style of <style>" works by loading both words ("load all"); blends and
concatenations make a new word `<name>` (its vectors are computed here, no training).
"""

from __future__ import annotations

from .common import CATEGORY, EMBEDDING_TYPE, PseudoWord, embeddings_folder

MODES = ["load all", "blend", "concatenate"]
SLOTS = 4


def _weights(text: str, count: int) -> list[float]:
    if not text.strip():
        return [1.0 / count] * count
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Weights {text!r} are not numbers: write them like '0.7, 0.3'.") from None
    if len(values) != count:
        raise ValueError(f"{len(values)} weights for {count} connected words: give one weight per word.")
    return values


def compose(words: list[PseudoWord], mode: str, weights: str = "") -> dict:
    """Vectors of the composed word per encoder key ('blend' / 'concatenate')."""
    import torch

    keys = set(words[0].vectors)
    for word in words[1:]:
        if set(word.vectors) != keys:
            raise ValueError(f"Words <{words[0].name}> and <{word.name}> are for different model families "
                             f"({', '.join(sorted(words[0].vectors))} vs {', '.join(sorted(word.vectors))}).")
    if mode == "concatenate":
        return {k: torch.cat([w.vectors[k].float() for w in words]) for k in keys}
    counts = {w.num_vectors for w in words}
    if len(counts) != 1:
        raise ValueError("Blending needs words with the same number of vectors "
                         f"(got {', '.join(str(w.num_vectors) for w in words)}); use concatenate instead.")
    factors = _weights(weights, len(words))
    return {k: sum(f * w.vectors[k].float() for f, w in zip(factors, words)) for k in keys}


class ComposeConcepts:
    """Combine pseudo-words: load several at once, blend them, or concatenate them."""

    CATEGORY = CATEGORY
    FUNCTION = "compose"
    OUTPUT_NODE = True
    RETURN_TYPES = ("CLIP", EMBEDDING_TYPE)
    RETURN_NAMES = ("clip", "embedding")
    OUTPUT_TOOLTIPS = ("The CLIP in which every connected word (and the composed word) can be typed.",
                       "The composed word (blend/concatenate), or the first word (load all).")
    DESCRIPTION = ("Load several learned words into one CLIP ('a photo of <clock> in the style of <style>'), "
                   "or make a new word from them: a weighted blend or a concatenation, optionally saved.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"embedding_{i}": (EMBEDDING_TYPE, {"tooltip": f"Word {i} (from Load Pseudo-word or Train "
                                                                   "Embedding)."}) for i in range(2, SLOTS + 1)}
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP to teach the words to (cloned, not changed)."}),
                "embedding_1": (EMBEDDING_TYPE, {"tooltip": "Word 1 (from Load Pseudo-word or Train Embedding)."}),
                "mode": (MODES, {"tooltip": "load all: each word typeable as <its-name>. blend: a weighted "
                                 "average into a new word. concatenate: one word made of all their vectors."}),
                "name": ("STRING", {"default": "composed", "tooltip": "Name of the new word (blend/concatenate): "
                                    "typed as <name>, saved as embeddings/<name>.safetensors."}),
                "weights": ("STRING", {"default": "", "tooltip": "Blend weights, one per connected word in "
                                       "order, e.g. '0.7, 0.3' (empty: equal)."}),
                "save": ("BOOLEAN", {"default": False, "tooltip": "Write the composed word to the embeddings "
                                     "folder (replacing a file of that name), so embedding:<name> works "
                                     "everywhere."}),
            },
            "optional": optional,
        }

    def compose(self, clip, embedding_1, mode, name, weights, save, **more):
        from ..textinv_core.embedding_file import save_embedding, validate_name
        from ..textinv_core.hosts.comfy import with_words

        words = [embedding_1] + [more[f"embedding_{i}"] for i in range(2, SLOTS + 1) if more.get(f"embedding_{i}")]
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}: choose one of {', '.join(MODES)}.")
        loaded = {w.placeholder: w.vectors for w in words}
        ui: list[str] = []
        if mode == "load all":
            if len(loaded) != len(words):
                raise ValueError("Two connected words have the same name: rename one in Load Pseudo-word.")
            result = words[0]
            if save:
                raise ValueError("'load all' makes no new word to save: choose blend or concatenate to save.")
        else:
            name = validate_name(name)
            vectors = compose(words, mode, weights)
            result = PseudoWord(name=name, vectors=vectors, family=words[0].family,
                                metadata={"textinv.composed": f"{mode} of {', '.join(w.name for w in words)}"})
            loaded[result.placeholder] = vectors
            if save:
                path = save_embedding(embeddings_folder() / f"{name}.safetensors", vectors, name,
                                      metadata=dict(result.metadata, **{"textinv.family": result.family}),
                                      overwrite=True)
                result.path = str(path)
                ui.append(f"saved {path.name}")
        ui.append("words: " + " ".join(loaded))
        return {"ui": {"text": ui}, "result": (with_words(clip, loaded), result)}
