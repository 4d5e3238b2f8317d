"""Harness-only stand-in for `torchvision`, put on the PYTHONPATH of the ComfyUI test server only.

Why: ComfyUI 0.3.64 imports torchvision at module level (comfy/sd.py -> comfy/ldm/cascade/
stage_c_coder.py; cosmos and ace models too), but the registry's torchvision wheels need a CUDA
build of torch, and this test environment pins a CPU torch that must never be replaced. The code
paths that really use torchvision (Stable Cascade's EfficientNet, Cosmos and ACE transforms) are
never reached by the SD1.5 / SD2 / SDXL checkpoints the integration tests build. So this module
only satisfies the imports; touching anything in it raises, so a test can never pass by silently
running fake torchvision code.

It is never shipped with the pack, never installed into the venv, and never imported by pytest
itself: tests/comfy/server.py adds this folder to the server subprocess's PYTHONPATH only.
"""

__version__ = "0.0.0+textinv-test-stand-in"


class _Unavailable:
    """Any attribute access or call says clearly that the real torchvision is absent."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} is not available: this is the textinv test harness's torchvision stand-in, "
            "which only satisfies ComfyUI's module-level imports."
        )


models = _Unavailable("torchvision.models")
