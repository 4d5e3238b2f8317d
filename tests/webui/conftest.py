"""Fixtures for the web-UI integration tests: skipped, with the reason shown, unless a web UI is named.

Run them with, per web UI (docs/WEBUI.md sets the folders up):
    WEBUI_A1111_PATH=/path/to/a1111 python -m pytest tests/webui -rs
    WEBUI_FORGE_PATH=/path/to/forge WEBUI_A1111_PATH=... python -m pytest tests/webui -rs
One server per web UI is shared by that web UI's tests; the tiny checkpoints are built once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .harness import UIS, WebUIServer, build_checkpoint, pinned_versions, run_installer, webui_path, webui_python


def pytest_configure(config):
    config.addinivalue_line("markers", "webui: needs a real A1111-family web UI named by WEBUI_*_PATH (slow)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/webui/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.webui)


@pytest.fixture(scope="module", params=sorted(UIS))
def ui(request):
    name = request.param
    path = webui_path(name)
    if path is None:
        pytest.skip(f"{UIS[name]} is not set: the {name} tests need that web UI's folder with its venv "
                    "(see docs/WEBUI.md)")
    if not (path / "launch.py").is_file():
        pytest.skip(f"{UIS[name]}={path} has no launch.py: it is not an A1111-family web UI")
    python = webui_python(name, path)
    if not python.exists():
        pytest.skip(f"{python} does not exist: give the web UI's Python as WEBUI_{name.upper()}_PYTHON")
    return name


@pytest.fixture(scope="module")
def checkpoints(ui):
    return {family: build_checkpoint(family) for family in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def server(ui, checkpoints):
    """One web UI with the pack installed as an extension, started on SD1.5; install.py ran first,
    as the web UI's launcher runs it, and the pinned versions were read before and after."""
    path = webui_path(ui)
    root = Path(tempfile.mkdtemp(prefix=f"textinv-webui-{ui}-"))
    srv = WebUIServer(ui, path, root, checkpoints["sd15"], others=(checkpoints["sdxl"],))
    srv.pins_before = pinned_versions(srv.python, path)
    srv.installer = run_installer(srv.python, path, srv.pack)
    srv.start()
    srv.pins_after = pinned_versions(srv.python, path)
    srv.results = {}
    yield srv
    srv.stop()
    if os.environ.get("TEXTINV_KEEP_SERVER_DIR") != "1":
        shutil.rmtree(root, ignore_errors=True)
