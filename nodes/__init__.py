"""The ComfyUI nodes of the pack (classic node API). Importing this is cheap: no torch, no ComfyUI.

Each node module imports torch, ComfyUI and the engine inside the functions that run, so that the
pack's import time in ComfyUI stays small and importing it outside ComfyUI never fails.
"""

from .compose import ComposeConcepts
from .pseudo_word import LoadPseudoWord
from .train import TrainEmbedding

NODE_CLASS_MAPPINGS = {
    "TextinvTrainEmbedding": TrainEmbedding,
    "TextinvLoadPseudoWord": LoadPseudoWord,
    "TextinvComposeConcepts": ComposeConcepts,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TextinvTrainEmbedding": "Train Embedding (textinv)",
    "TextinvLoadPseudoWord": "Load Pseudo-word (textinv)",
    "TextinvComposeConcepts": "Compose Concepts (textinv)",
}
