"""Loss curves drawn with PIL alone (no plotting library to install): training loss, smoothed,
and the evaluation loss as dots. Used by the CLI/demo (PNG) and the ComfyUI node (IMAGE output).
"""

from __future__ import annotations

from PIL import Image, ImageDraw


def _smooth(values: list[float], alpha: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def loss_curve_image(train_losses: list[float], eval_losses: list[tuple[int, float]],
                     width: int = 512, height: int = 256, title: str = "loss") -> Image.Image:
    """Train loss (grey raw, blue smoothed) and eval loss (orange dots) against step."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 12, 22, height - 24
    values = list(train_losses) + [v for _, v in eval_losses]
    steps = max(len(train_losses), max((s for s, _ in eval_losses), default=0), 1)
    if not values:
        draw.text((left, height // 2), "no data yet", fill=(90, 90, 90))
        return image
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (right - left) * step / steps
        y = bottom - (bottom - top) * (value - low) / (high - low)
        return x, y

    draw.rectangle((left, top, right, bottom), outline=(200, 200, 200))
    for frac in (0.0, 0.5, 1.0):
        value = low + (high - low) * frac
        y = bottom - (bottom - top) * frac
        draw.text((4, y - 6), f"{value:.3g}", fill=(90, 90, 90))
    draw.text((left, 4), f"{title}  (grey/blue: train, orange: eval)", fill=(40, 40, 40))
    draw.text((right - 60, bottom + 6), f"step {steps}", fill=(90, 90, 90))
    if len(train_losses) > 1:
        draw.line([xy(i + 1, v) for i, v in enumerate(train_losses)], fill=(200, 200, 200), width=1)
        draw.line([xy(i + 1, v) for i, v in enumerate(_smooth(train_losses))], fill=(40, 90, 200), width=2)
    for step, value in eval_losses:
        x, y = xy(step, value)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(240, 120, 20))
    return image
