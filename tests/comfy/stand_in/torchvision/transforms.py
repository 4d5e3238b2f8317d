"""`torchvision.transforms` for the harness stand-in: see the package docstring. Every use raises."""

from . import _Unavailable


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable(f"torchvision.transforms.{name}")
