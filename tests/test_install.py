"""install.py is idempotent and can never install or upgrade torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_installer():
    # Loaded by path: the pack root must never go on sys.path (ComfyUI has its own `nodes`).
    spec = importlib.util.spec_from_file_location("textinv_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_second_run_installs_nothing(capsys, monkeypatch):
    installer = load_installer()
    monkeypatch.setattr(installer, "pip_install", lambda missing: (_ for _ in ()).throw(AssertionError(missing)))
    assert installer.main() == 0
    assert "already satisfied" in capsys.readouterr().out


def test_torch_family_is_never_requested(tmp_path, monkeypatch, capsys):
    installer = load_installer()
    (tmp_path / "requirements.txt").write_text("torch>=99\ntorchvision\nspandrel\nnot-a-real-package-xyz>=1\n")
    monkeypatch.setattr(installer, "HERE", tmp_path)
    monkeypatch.setenv("TEXTINV_INSTALL_DRY_RUN", "1")
    assert installer.requirements() == ["not-a-real-package-xyz>=1"]
    installer.main()
    assert capsys.readouterr().out.strip() == "textinv: would install not-a-real-package-xyz>=1"


def test_installed_torch_is_pinned():
    installer = load_installer()
    import torch

    assert installer.torch_pin() == f"torch=={torch.__version__}"
