"""Inside ComfyUI the pack is imported under whatever its folder is called: only relative imports work."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_code_never_imports_the_engine_by_absolute_name():
    offenders = []
    for path in [ROOT / "__init__.py", *ROOT.glob("nodes/**/*.py"), *ROOT.glob("textinv_core/**/*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"\s*(from|import)\s+(textinv_core|nodes)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def _import_root_as(name: str, package: bool):
    import importlib.util
    import sys

    locations = [str(ROOT)] if package else None
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return module


def test_the_pack_imports_under_a_folder_name_that_is_not_an_identifier():
    """ComfyUI-Manager's folder names have hyphens; ComfyUI imports the folder as a package anyway."""
    pack = _import_root_as("textinv-pack-main", package=True)
    assert set(pack.NODE_CLASS_MAPPINGS) == {"TextinvTrainEmbedding", "TextinvLoadPseudoWord",
                                             "TextinvComposeConcepts"}


def test_the_root_module_alone_imports_without_error():
    """pytest imports the root __init__.py as a lone module when the checkout's folder name is not an
    identifier ("textinv-main"); it must not fail there (it would fail every test of the suite)."""
    lone = _import_root_as("__init__", package=False)
    assert lone.NODE_CLASS_MAPPINGS == {} and lone.WEB_DIRECTORY == "./web"
