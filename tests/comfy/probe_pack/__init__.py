"""Harness-only ComfyUI node pack (installed only by the integration tests, never shipped).

`TextinvTestSaveConditioning` writes a CONDITIONING's tensors to output/probe/<name>.safetensors so a
test can compare, bit for bit, what two prompts encode to (HTTP gives no access to tensors).
"""

import os


class SaveConditioning:
    CATEGORY = "_for_testing"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING", {"tooltip": "What to save."}),
                             "name": ("STRING", {"default": "cond", "tooltip": "File name (no extension)."})}}

    def save(self, conditioning, name):
        import folder_paths
        from safetensors.torch import save_file

        tensors = {}
        for i, (cond, extra) in enumerate(conditioning):
            tensors[f"{i}.cond"] = cond.float().contiguous().clone()
            if extra.get("pooled_output") is not None:
                tensors[f"{i}.pooled"] = extra["pooled_output"].float().contiguous().clone()
        folder = os.path.join(folder_paths.get_output_directory(), "probe")
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
        return {"ui": {"text": [name]}}


NODE_CLASS_MAPPINGS = {"TextinvTestSaveConditioning": SaveConditioning}
