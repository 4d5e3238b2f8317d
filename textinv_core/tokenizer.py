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
