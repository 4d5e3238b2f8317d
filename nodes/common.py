"""What the textinv nodes share: the typed word handle, folder look-ups and small conversions.

Never imports torch or ComfyUI at module level (the pack's import must stay cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CATEGORY = "textinv"
EMBEDDING_TYPE = "TEXTINV_EMBEDDING"
NO_FILE = "(none)"


@dataclass
class PseudoWord:
    """A learned word travelling between nodes: vectors per encoder key ('clip_l', ...), [k, width]."""

    name: str
    vectors: dict[str, Any]
    family: str = ""
    path: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def embedding_files() -> list[str]:
    import folder_paths

    return [NO_FILE] + sorted(folder_paths.get_filename_list("embeddings"))


def embeddings_folder():
    """The first embeddings folder: ComfyUI's tokenizers look there for `embedding:name`."""
    from pathlib import Path

    import folder_paths

    return Path(folder_paths.get_folder_paths("embeddings")[0])


def image_tensor(pil_image):
    """PIL -> ComfyUI IMAGE [1, H, W, 3] float in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def placeholder_for(word: str, name: str) -> str:
    """The text users type: the given word, or `<name>` when left empty."""
    from ..textinv_core.errors import UserError

    word = (word or "").strip()
    if not word:
        return f"<{name}>"
    if any(c in word for c in "\n\r\t"):
        raise UserError(f"The word {word!r} contains a line break or tab: use one word such as <my-cat>.")
    if ":" in word or "(" in word or ")" in word:
        raise UserError(f"The word {word!r} contains ':', '(' or ')', which prompts use for weights: "
                        "use a word such as <my-cat>.")
    if len(word) > 100:
        raise UserError(f"The word {word[:20]!r}... is {len(word)} characters long: use a short word such as <my-cat>.")
    return word
