"""Fixtures for the ComfyUI integration tests: skipped, with the reason shown, without COMFYUI_PATH.

Run them with:  COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfy -rs
(requirements: tests/comfy/requirements-comfy.txt). One server is shared by the whole session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .harness import FAMILIES, ComfyServer, build_checkpoint, comfyui_path, write_training_images


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: needs a real ComfyUI checkout named by COMFYUI_PATH (slow)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/comfy/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session")
def comfy_path():
    path = comfyui_path()
    if path is None:
        pytest.skip("COMFYUI_PATH is not set: the ComfyUI integration tests need a ComfyUI 0.3.64 checkout "
                    "(see tests/comfy/conftest.py)")
    if not (path / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} has no main.py: it is not a ComfyUI checkout")
    return path


@pytest.fixture(scope="session")
def checkpoints(comfy_path):
    return {family: build_checkpoint(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def server(checkpoints):
    # Not tmp_path_factory: pytest prunes old basetemp folders, and other pytest runs on the same
    # machine could delete this one while the server still writes into it.
    root = Path(tempfile.mkdtemp(prefix="textinv-comfy-"))
    srv = ComfyServer(root, checkpoints)
    write_training_images(srv.input / "textinv-disc")
    srv.start()
    yield srv
    srv.stop()
    if os.environ.get("TEXTINV_KEEP_SERVER_DIR") != "1":
        shutil.rmtree(root, ignore_errors=True)
