"""Harness-only stand-in for `torchvision`, on the PYTHONPATH of the web-UI test servers only.

Why: A1111, Forge and reForge (and open_clip, k-diffusion) import torchvision at module level, but
the registry's torchvision wheels need a CUDA build of torch, and the test venvs pin the local CPU
torch, which must never be replaced. The code paths that really use torchvision (upscalers, face
restoration, BLIP interrogation, open_clip's image transforms) are never reached by txt2img and
training on the tiny checkpoints. So any `torchvision.*` module can be imported here, and using
anything in it raises: a test can never pass by silently running fake torchvision code. One
exception: a transform *class* under torchvision.transforms (CamelCase, e.g. `Compose`, `Resize`)
can be constructed, because open_clip builds its image preprocessing while A1111/sgm create the
OpenCLIP text encoder (the vision tower and its preprocessing are then discarded); applying such a
transform raises like everything else.

Never shipped with the pack, never installed into a venv, never imported by pytest itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+textinv-test-stand-in"


class _Unavailable:
    """Any attribute access gives another placeholder; any call says clearly that torchvision is absent."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        last = self._name.rsplit(".", 1)[-1]
        if self._name.startswith("torchvision.transforms.") and last[:1].isupper() and not last.endswith(")"):
            return _Unavailable(f"{self._name}(...)")  # a transform object; applying it raises
        raise RuntimeError(f"{self._name} is not available: this is the textinv web-UI test harness's "
                           "torchvision stand-in, which only satisfies module-level imports.")

    def __mro_entries__(self, bases):
        return (object,)  # `class X(torchvision.thing):` still defines X


def _module_getattr(prefix):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{prefix}.{attr}")

    return __getattr__


__getattr__ = _module_getattr("torchvision")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
