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


def fake_webui(tmp_path, requirements: str):
    """A web-UI folder as A1111/Forge/reForge lay it out, with the pack in extensions/."""
    root = tmp_path / "webui"
    (root / "modules").mkdir(parents=True)
    (root / "launch.py").write_text("")
    (root / "requirements_versions.txt").write_text("Pillow==9.5.0\ntransformers==4.30.2  # pinned\ntorch\n")
    pack = root / "extensions" / "textinv"
    pack.mkdir(parents=True)
    (pack / "requirements.txt").write_text(requirements)
    return root, pack


def test_under_a_web_ui_pinned_packages_are_reported_not_installed(tmp_path, monkeypatch, capsys):
    installer = load_installer()
    root, pack = fake_webui(tmp_path, "transformers>=99\ndiffusers>=99\nnot-a-real-package-xyz>=1\n")
    monkeypatch.setattr(installer, "HERE", pack)
    calls = []
    monkeypatch.setattr(installer, "pip_install", lambda missing, constraints=(): calls.append((missing, constraints)))
    assert installer.webui_root() == root
    assert installer.main() == 0
    out = capsys.readouterr().out
    assert "web UI pins transformers==4.30.2: left as the web UI has it" in out
    assert "diffusers>=99" in out and "not installed" in out
    # Only the package nobody pins is installed, with the web UI's pins as constraints.
    assert calls == [(["not-a-real-package-xyz>=1"], ["Pillow==9.5.0", "transformers==4.30.2"])]


def test_under_a_web_ui_nothing_is_installed_when_only_pins_are_unmet(tmp_path, monkeypatch, capsys):
    installer = load_installer()
    _, pack = fake_webui(tmp_path, "transformers>=99\npillow>=99\n")
    monkeypatch.setattr(installer, "HERE", pack)
    monkeypatch.setattr(installer, "pip_install", lambda *a: (_ for _ in ()).throw(AssertionError(a)))
    assert installer.main() == 0
    out = capsys.readouterr().out
    assert out.count("left as the web UI has it") == 2


def test_under_a_web_ui_a_failed_install_does_not_stop_start_up(tmp_path, monkeypatch, capsys):
    installer = load_installer()
    _, pack = fake_webui(tmp_path, "not-a-real-package-xyz>=1\n")
    monkeypatch.setattr(installer, "HERE", pack)

    def fail(*args):
        raise RuntimeError("no index")

    monkeypatch.setattr(installer, "pip_install", fail)
    assert installer.main() == 0
    assert "could not install not-a-real-package-xyz>=1 (no index)" in capsys.readouterr().out


def test_constraints_file_carries_torch_and_the_web_ui_pins(tmp_path, monkeypatch):
    installer = load_installer()
    seen = {}

    def fake_check_call(cmd):
        seen["constraints"] = Path(cmd[cmd.index("-c") + 1]).read_text().split()

    monkeypatch.setattr(installer.subprocess, "check_call", fake_check_call)
    monkeypatch.setitem(__import__("sys").modules, "launch", None)  # not under A1111's launcher
    installer.pip_install(["x"], ["Pillow==9.5.0", "torch==1.0"])
    import torch

    assert seen["constraints"] == [f"torch=={torch.__version__}", "Pillow==9.5.0"]
