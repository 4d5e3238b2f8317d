"""Compose Concepts: several learned words in one CLIP, a weighted blend of words into a new word,
or their concatenation into one multi-vector word; optionally saved as an embedding file.

"a photo of <clock> in the style of <style>" works by loading both words ("load all"); blends and
concatenations make a new word `<name>` whose vectors the engine computes (textinv_core/compose.py).
A saved word never replaces an existing file unless `overwrite` is on.
"""

from __future__ import annotations

from .common import CATEGORY, EMBEDDING_TYPE, PseudoWord, embeddings_folder

MODES = ["load all", "blend", "concatenate"]
SLOTS = 4


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
                                     "folder, so embedding:<name> works everywhere."}),
            },
            "optional": {
                **optional,
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "With save: replace an existing embedding "
                              "file of this name (otherwise the node refuses, and a trained word is never lost)."}),
            },
        }

    def compose(self, clip, embedding_1, mode, name, weights, save, overwrite=False, **more):
        from ..textinv_core.compose import compose_vectors
        from ..textinv_core.embedding_file import save_embedding, validate_name
        from ..textinv_core.errors import UserError
        from ..textinv_core.hosts.comfy import with_words
        from ..textinv_core.inputs import NODE_LABELS, check_word_output
        from ..textinv_core.metadata import composed_metadata

        words = [embedding_1] + [more[f"embedding_{i}"] for i in range(2, SLOTS + 1) if more.get(f"embedding_{i}")]
        if any(not (hasattr(w, "vectors") and hasattr(w, "placeholder")) for w in words):
            raise UserError("Connect words from Load Pseudo-word, Train Embedding or Compose Concepts to the "
                            "embedding inputs.")
        if mode not in MODES:
            raise UserError(f"Unknown mode {mode!r}: choose one of {', '.join(MODES)}.")
        loaded = {w.placeholder: w.vectors for w in words}
        ui: list[str] = []
        if mode == "load all":
            if len(loaded) != len(words):
                raise UserError("Two connected words have the same name: rename one in Load Pseudo-word.")
            result = words[0]
            if save:
                raise UserError("'load all' makes no new word to save: choose blend or concatenate to save.")
        else:
            name = validate_name(name)
            target = embeddings_folder() / f"{name}.safetensors"
            if save:  # an existing word, a read-only or full folder: refused before any work, like Train Embedding
                check_word_output(target, overwrite, name, NODE_LABELS)
            vectors = compose_vectors([(w.name, w.vectors) for w in words], mode, weights)
            metadata = composed_metadata(words[0].family, mode, [w.name for w in words])
            result = PseudoWord(name=name, vectors=vectors, family=words[0].family, metadata=metadata)
            loaded[result.placeholder] = vectors
            if save:
                path = save_embedding(target, vectors, name, metadata=metadata, overwrite=overwrite)
                result.path = str(path)
                ui.append(f"saved {path.name}")
        ui.append("words: " + " ".join(loaded))
        return {"ui": {"text": ui}, "result": (with_words(clip, loaded), result)}
