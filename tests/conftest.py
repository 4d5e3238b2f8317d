"""Shared fixtures: tiny random models in the three real layouts, built once per session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_host():
    """tiny_host(family) -> a DiffusersHost on a tiny random model (cached per family)."""
    from textinv_core.hosts.diffusers_host import DiffusersHost
    from textinv_core.tiny_models import build_tiny_components

    cache = {}

    def get(family: str) -> DiffusersHost:
        if family not in cache:
            cache[family] = DiffusersHost(build_tiny_components(family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory):
    from textinv_core.tiny_models import save_tiny_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sd1"
    save_tiny_pipeline("sd1", folder)
    return folder


def make_images(count: int = 3, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture
def images():
    return make_images()
