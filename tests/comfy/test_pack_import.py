"""The pack's root imports outside ComfyUI, cheaply, under any folder name (no COMFYUI_PATH needed)."""

from __future__ import annotations

import json
import subprocess
import sys

from .harness import REPO

SCRIPT = r"""
import importlib.util, json, sys, time
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("renamed_textinv_pack", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
print(json.dumps({"seconds": time.perf_counter() - start, "nodes": sorted(pack.NODE_CLASS_MAPPINGS),
                  "web": pack.WEB_DIRECTORY, "heavy": sorted(m for m in ("torch", "diffusers", "comfy", "folder_paths")
                                                            if m in sys.modules)}))
"""


def test_pack_imports_outside_comfyui_without_torch_and_quickly():
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["nodes"] == ["TextinvComposeConcepts", "TextinvLoadPseudoWord", "TextinvTrainEmbedding"]
    assert info["web"] == "./web" and (REPO / "web" / "textinv.js").is_file()
    assert info["heavy"] == []
    assert info["seconds"] < 0.5
