"""Figures for the toy-world benchmark, drawn with PIL alone: a sample grid and the paper's Fig. 10
style scatter of reconstruction against editability. Never computes a metric.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

CELL = 48  # on-screen size of one 16-pixel sample
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def image_grid(rows: list[tuple[str, list[Image.Image]]], label_width: int = 150, gap: int = 2) -> Image.Image:
    """One labelled row of enlarged images per entry (nearest-neighbour, so pixels stay honest)."""
    columns = max((len(images) for _, images in rows), default=1)
    width = label_width + columns * (CELL + gap)
    grid = Image.new("RGB", (width, len(rows) * (CELL + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = gap + r * (CELL + gap)
        draw.text((4, top + CELL // 2 - 6), label[:24], fill=(0, 0, 0))
        for c, image in enumerate(images):
            grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (label_width + c * (CELL + gap), top))
    return grid


def scatter(points: list[tuple[str, float, float]], title: str = "", size: int = 420) -> Image.Image:
    """Reconstruction (y) against editability (x), both in [0, 1], one labelled dot per entry."""
    image = Image.new("RGB", (size + 160, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 24, size - 10, size - 40
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for i in range(6):
        v = i / 5
        x = left + v * (right - left)
        y = bottom - v * (bottom - top)
        draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        draw.text((x - 8, bottom + 6), f"{v:.1f}", fill=(0, 0, 0))
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((left - 30, y - 6), f"{v:.1f}", fill=(0, 0, 0))
    draw.text((left + (right - left) // 2 - 30, bottom + 22), "editability", fill=(0, 0, 0))
    draw.text((4, top - 18), "reconstruction", fill=(0, 0, 0))
    draw.text((left + 100, 4), title[:60], fill=(0, 0, 0))
    for i, (label, recon, edit) in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        x = left + edit * (right - left)
        y = bottom - recon * (bottom - top)
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        draw.ellipse((size + 4, 30 + 18 * i, size + 14, 40 + 18 * i), fill=colour)
        draw.text((size + 20, 28 + 18 * i), label[:22], fill=(0, 0, 0))
    return image
