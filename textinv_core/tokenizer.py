"""The real CLIP BPE tokenizer, from files the pack carries (no hub download).

The files are rebuilt from OpenAI's released BPE table by tools/build_clip_tokenizer.py; they
tokenize exactly like the tokenizer that ships with SD1.x/SD2.x/SDXL.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer; SD1 pads with `<|endoftext|>`, SD2/SDXL's second with `!`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(ASSET_DIR / "vocab.json"), str(ASSET_DIR / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def vocabulary_strings(tokenizer, size: int) -> list[str]:
    """Each id's text for a transformers CLIP tokenizer: '</w>' dropped, special tokens ''."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    return ["" if i in special or token is None else token.replace("</w>", "") for i, token in enumerate(tokens)]


def clip_vocabulary_strings(size: int = 49408) -> list[str]:
    """The CLIP BPE vocabulary every SD1.x, SD2.x and SDXL text encoder shares, from the pack's own files
    (for hosts whose tokenizer is not a transformers one, e.g. OpenCLIP's in the web UIs)."""
    return vocabulary_strings(clip_tokenizer(), size)
