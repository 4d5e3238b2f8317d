"""Load Pseudo-word: a CLIP in which `<my-cat>` types a learned word, in this branch of the graph only.

The CLIP is cloned and given a copy of its tokenizer that resolves the word from memory (see
textinv_core/hosts/comfy.py `tokenizer_with_words`), so prompt weights like `(<my-cat>:1.2)`,
multi-vector words and long prompts behave exactly as ComfyUI's own `embedding:my-cat`. Other
branches keep the original tokenizer. A file for another model family is an error the user sees.
"""

from __future__ import annotations

from .common import CATEGORY, EMBEDDING_TYPE, NO_FILE, PseudoWord, embedding_files, placeholder_for


def load_word(clip, embedding_file: str, embedding: PseudoWord | None) -> PseudoWord:
    """The word from the connected handle, else from the chosen file; vectors fitted to this CLIP."""
    from pathlib import Path

    from ..textinv_core.embedding_file import EmbeddingFile, vectors_for_encoders
    from ..textinv_core.errors import UserError
    from ..textinv_core.hosts.comfy import clip_encoders, clip_family
    from ..textinv_core.inputs import check_word_file

    encoders = clip_encoders(clip)
    family = clip_family(clip)
    if embedding is not None:
        source = EmbeddingFile(vectors=dict(embedding.vectors), name=embedding.name, format="textinv",
                               metadata=dict(embedding.metadata))
        path = embedding.path
    else:
        if not embedding_file or embedding_file == NO_FILE:
            raise UserError("Load Pseudo-word: choose an embedding file, or connect an embedding from "
                            "Train Embedding or Compose Concepts.")
        import folder_paths

        path = folder_paths.get_full_path("embeddings", embedding_file)
        if path is None:
            raise UserError(f"Embedding file {embedding_file!r} is not in the embeddings folder any more.")
        source = check_word_file(path)  # an embedding, readable, every value finite
        source.name = Path(embedding_file).stem  # the word defaults to <file-name>
    vectors = vectors_for_encoders(source, encoders)
    return PseudoWord(name=source.name, vectors=vectors, family=family, path=path, metadata=source.metadata)


class LoadPseudoWord:
    """Teach a CLIP one pseudo-word; chain several to use several words in one prompt."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP", EMBEDDING_TYPE)
    RETURN_NAMES = ("clip", "embedding")
    OUTPUT_TOOLTIPS = ("The CLIP in which the word can be typed (this branch only).",
                       "The word as loaded (strength applied), for Compose Concepts.")
    DESCRIPTION = ("Makes a learned word typeable as <name> in CLIP Text Encode nodes downstream, weights like "
                   "(<name>:1.2) included. Works for SD1.x, SD2.x and SDXL embeddings.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP to teach the word to (it is cloned, not changed)."}),
                "embedding_file": (embedding_files(), {"tooltip": "An embedding from the embeddings folder "
                                   "(ignored when an embedding is connected below)."}),
                "word": ("STRING", {"default": "", "tooltip": "What you will type in prompts. Empty: <file-name>, "
                         "e.g. <my-cat> for my-cat.safetensors."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scales the word's vectors (1 = as trained)."}),
            },
            "optional": {
                "embedding": (EMBEDDING_TYPE, {"tooltip": "A word from Train Embedding or Compose Concepts; "
                              "overrides the file."}),
            },
        }

    def load(self, clip, embedding_file, word, strength, embedding=None):
        from ..textinv_core.hosts.comfy import with_words
        from ..textinv_core.inputs import check_number

        strength = check_number(strength, "strength", -10.0, 10.0)
        placeholder_for(word, "word")  # a bad word is refused before the file is read
        loaded = load_word(clip, embedding_file, embedding)
        vectors = {k: v.float() * float(strength) for k, v in loaded.vectors.items()}
        placeholder = placeholder_for(word, loaded.name)
        out = PseudoWord(name=loaded.name, vectors=vectors, family=loaded.family, path=loaded.path,
                         metadata=loaded.metadata)
        return (with_words(clip, {placeholder: vectors}), out)
