"""Install textinv's Python dependencies into the running interpreter; safe to run any number of times.

Run by ComfyUI-Manager (after requirements.txt) and by the Automatic1111 family (A1111, Forge,
reForge) on every launch. It only installs what requirements.txt lists and is missing, and it pins
whatever torch is already installed so pip can never replace it (a registry torch would be a
multi-GB CUDA build). It never installs torch, torchvision or torchaudio.

Under a web UI (the pack sits in `<webui>/extensions/`, or the installer runs from a web UI's
folder), the web UI's own pins (`requirements_versions.txt`) win: a requirement the web UI pins is
never installed or upgraded, only reported; what the web-UI tab does not need (diffusers, for the
command line) is not installed; anything else goes through pip with the web UI's pins as
constraints, so pip cannot move a pinned package either. A failed install is reported, never
raised: the web UI must start anyway.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEVER = {"torch", "torchvision", "torchaudio", "spandrel"}
# Needed by the command line's diffusers host only; the web-UI hosts use the web UI's own models.
CLI_ONLY = {"diffusers"}


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    reqs = [line.split("#")[0].strip() for line in lines]
    return [r for r in reqs if r and _name(r) not in NEVER]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def is_satisfied(requirement: str) -> bool:
    """Installed and inside the requested range (checked with `packaging` when it is there)."""
    try:
        version = importlib.metadata.version(_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def torch_pin() -> str | None:
    try:
        return f"torch=={importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        return None


def webui_root() -> Path | None:
    """The A1111-family web UI folder this runs under, or None (ComfyUI, a plain environment)."""
    for folder in (HERE.parent.parent, Path.cwd()):
        if (folder / "requirements_versions.txt").is_file() and (folder / "launch.py").is_file() \
                and (folder / "modules").is_dir():
            return folder
    return None


def webui_pins(root: Path) -> dict[str, str]:
    """Package name -> the `name==version` line the web UI pins in its requirements_versions.txt."""
    pins = {}
    for line in (root / "requirements_versions.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            pins[_name(line)] = line
    return pins


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install(missing: list[str], extra_constraints: list[str] = ()) -> None:
    pin = torch_pin()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["install", *missing]
        lines = ([pin] if pin else []) + [c for c in extra_constraints if _name(c) != "torch"]
        if lines:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("\n".join(lines) + "\n")
            args += ["-c", str(constraints)]
        try:
            import launch  # Automatic1111: use its pip wrapper (same interpreter, its index settings)

            launch.run_pip(" ".join(f'"{a}"' for a in args), "textinv requirements")
            return
        except ImportError:
            pass
        subprocess.check_call([sys.executable, "-m", "pip", *args])


def main_webui(root: Path) -> int:
    """Under a web UI: report what its pins leave unmet, install only what nobody pins."""
    pins = webui_pins(root)
    missing = [r for r in requirements() if not is_satisfied(r)]
    free = []
    for requirement in missing:
        name = _name(requirement)
        have = installed_version(name)
        if name in CLI_ONLY:
            print(f"textinv: {requirement} is {'at ' + have if have else 'not installed'}; only the textinv "
                  "command line needs it, the web-UI tab does not: not installed")
        elif name in pins:
            print(f"textinv: {requirement} is not met ({have or 'not installed'}), but the web UI pins "
                  f"{pins[name]}: left as the web UI has it")
        else:
            free.append(requirement)
    if not free:
        if not missing:
            print("textinv: requirements already satisfied")
        return 0
    if os.environ.get("TEXTINV_INSTALL_DRY_RUN"):
        print("textinv: would install " + " ".join(free))
        return 0
    print("textinv: installing " + " ".join(free) + " (the web UI's pins as constraints)")
    try:
        pip_install(free, list(pins.values()))
    except Exception as error:  # noqa: BLE001 - the web UI must start whatever pip did
        print(f"textinv: could not install {' '.join(free)} ({error}); install them by hand")
    return 0


def main() -> int:
    root = webui_root()
    if root is not None:
        return main_webui(root)
    missing = [r for r in requirements() if not is_satisfied(r)]
    if not missing:
        print("textinv: requirements already satisfied")
        return 0
    if os.environ.get("TEXTINV_INSTALL_DRY_RUN"):
        print("textinv: would install " + " ".join(missing))
        return 0
    print("textinv: installing " + " ".join(missing))
    pip_install(missing)
    if torch_pin() is None:
        print("textinv: torch is not installed; install the torch build for your GPU first (textinv never does).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
