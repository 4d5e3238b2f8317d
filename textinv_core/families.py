"""Model families and their text encoders: the one map every host, file and message uses.

A pseudo-word has one [k, width] tensor per text encoder of its family; the encoder keys are the
ones A1111, ComfyUI and diffusers use in files ('clip_l', 'clip_h', 'clip_g').
"""

from __future__ import annotations

ENCODER_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
FAMILY_ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_WIDTH_NAMES = {768: "SD1.x / SDXL clip_l", 1024: "SD2.x", 1280: "SDXL clip_g"}


def encoder_keys(family: str) -> tuple[str, ...]:
    return FAMILY_ENCODERS[family]


def family_of_encoders(keys) -> str | None:
    """'sd1' / 'sd2' / 'sdxl' for a set of encoder keys, None when no family has exactly those."""
    wanted = set(keys)
    return next((family for family, have in FAMILY_ENCODERS.items() if set(have) == wanted), None)


def describe_width(width: int) -> str:
    """'768 wide (SD1.x / SDXL clip_l)': how an error names a tensor's family."""
    family = _WIDTH_NAMES.get(width)
    return f"{width} wide ({family})" if family else f"{width} wide"
