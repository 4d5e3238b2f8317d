"""textinv as a ComfyUI custom node pack: Train Embedding, Load Pseudo-word, Compose Concepts.

ComfyUI imports this folder as a package under whatever name the folder has (the registry and
ComfyUI-Manager rename it), so every import inside the pack is relative. Importing it is cheap and
never imports torch, diffusers or ComfyUI: the nodes load them when they run.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a lone module, not as the pack: pytest does this with a checkout whose folder name
    # is not a Python identifier ("textinv-main"). There is no package to load the nodes from.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
