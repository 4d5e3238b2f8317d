"""Install textinv's Python dependencies into the running interpreter; safe to run any number of times.

Run by ComfyUI-Manager (after requirements.txt) and by Automatic1111 on every launch, where its
`launch` module is importable. It only installs what requirements.txt lists and is missing, and
it pins whatever torch is already installed so pip can never replace it (a registry torch would
be a multi-GB CUDA build). It never installs torch, torchvision or torchaudio.
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


def pip_install(missing: list[str]) -> None:
    pin = torch_pin()
    with tempfile.TemporaryDirectory() as tmp:
        args = ["install", *missing]
        if pin:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(pin + "\n")
            args += ["-c", str(constraints)]
        try:
            import launch  # Automatic1111: use its pip wrapper (same interpreter, its index settings)

            launch.run_pip(" ".join(f'"{a}"' for a in args), "textinv requirements")
            return
        except ImportError:
            pass
        subprocess.check_call([sys.executable, "-m", "pip", *args])


def main() -> int:
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
