"""Rebuild the real CLIP BPE tokenizer files (vocab.json, merges.txt) offline.

Why: no hub download is possible, but the registry package `openai-clip` ships OpenAI's
`bpe_simple_vocab_16e6.txt.gz`. This follows clip/simple_tokenizer.py's construction exactly
(byte table, `</w>` forms, the first 48894 merges, the two special tokens: 49408 entries).
Run: pip install openai-clip && python tools/build_clip_tokenizer.py
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "textinv_core" / "assets" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode table of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main() -> int:
    spec = importlib.util.find_spec("clip")  # located, never imported: its __init__ needs torchvision
    if spec is None or not spec.submodule_search_locations:
        print("install the registry package openai-clip first", file=sys.stderr)
        return 1
    bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
