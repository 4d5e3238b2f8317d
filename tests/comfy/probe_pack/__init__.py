"""Harness-only ComfyUI node pack (installed only by the integration tests, never shipped).

`TextinvTestSaveConditioning` writes a CONDITIONING's tensors to output/probe/<name>.safetensors so a
test can compare, bit for bit, what two prompts encode to (HTTP gives no access to tensors).

`UpscaleModelLoader` stand-in: the test environment has no spandrel (it needs torchvision), so
ComfyUI's comfy_extras/nodes_upscale_model.py does not import, and the 0.3.64 front end then throws
while creating *any* model-loader combo widget (its model-to-node map expects that node), so even a
Load Checkpoint node cannot be created in the browser. Registered only when the real node is
missing; running it raises.
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


class MissingUpscaleModelLoader:
    CATEGORY = "_for_testing"
    FUNCTION = "load"
    RETURN_TYPES = ("UPSCALE_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"model_name": (folder_paths.get_filename_list("upscale_models"),
                                            {"tooltip": "Stand-in: spandrel is not installed."})}}

    def load(self, model_name):
        raise RuntimeError("The test environment has no spandrel: upscale models cannot load here.")


NODE_CLASS_MAPPINGS = {"TextinvTestSaveConditioning": SaveConditioning}


def _real_upscale_loader_missing() -> bool:
    try:
        import nodes

        return "UpscaleModelLoader" not in nodes.NODE_CLASS_MAPPINGS
    except Exception:
        return False


if _real_upscale_loader_missing():
    NODE_CLASS_MAPPINGS["UpscaleModelLoader"] = MissingUpscaleModelLoader
