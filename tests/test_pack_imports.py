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
