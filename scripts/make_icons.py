#!/usr/bin/env python3
"""Render the extension and module icons of the LCTfound Slicer extension with Pillow.

The icons are drawn from code (no image assets) so they can be regenerated and restyled:

    python scripts/make_icons.py            # writes every icon
    python scripts/make_icons.py --check    # exits 1 if a committed icon differs from the drawing

Outputs (all 128×128 RGBA PNG):
    Resources/Icons/LCTfound.png                                  extension icon (catalog)
    LCTfoundSegmentation/Resources/Icons/LCTfoundSegmentation.png lungs with a coloured segment
    LCTfoundEnhance/Resources/Icons/LCTfoundEnhance.png           lungs, noisy half → clean half
    LCTfoundTrain/Resources/Icons/LCTfoundTrain.png               lungs with a circular "learn" arrow

Drawing happens at 4× size and is downsampled, for smooth edges. Noise uses a fixed seed, so
the output is byte-for-byte reproducible with a given Pillow version.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageChops, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
SCALE = 4
CANVAS = SIZE * SCALE

BACKGROUND_TOP = (24, 44, 78)
BACKGROUND_BOTTOM = (10, 22, 44)
LUNG = (226, 232, 240)
LUNG_SHADE = (176, 190, 208)
AIRWAY = (150, 168, 192)
SEGMENT = (64, 200, 120)
ACCENT = (255, 196, 64)

Point = tuple[float, float]

# One lung (the patient's right lung, drawn on the image's left) as control points of a closed
# smooth curve in a unit box: apex, lateral edge, base, medial edge with the hilum.
RIGHT_LUNG: list[Point] = [
    (0.40, 0.17),
    (0.30, 0.24),
    (0.21, 0.40),
    (0.15, 0.60),
    (0.14, 0.78),
    (0.22, 0.86),
    (0.34, 0.83),
    (0.45, 0.79),
    (0.455, 0.62),
    (0.43, 0.48),
    (0.455, 0.30),
]


def _catmull_rom(points: Sequence[Point], samples: int = 24) -> list[Point]:
    """A closed Catmull-Rom spline through ``points``."""
    curve: list[Point] = []
    count = len(points)
    for index in range(count):
        p0, p1, p2, p3 = (points[(index + offset) % count] for offset in (-1, 0, 1, 2))
        for step in range(samples):
            t = step / samples
            t2, t3 = t * t, t * t * t
            curve.append(
                tuple(
                    0.5
                    * (
                        2 * p1[axis]
                        + (-p0[axis] + p2[axis]) * t
                        + (2 * p0[axis] - 5 * p1[axis] + 4 * p2[axis] - p3[axis]) * t2
                        + (-p0[axis] + 3 * p1[axis] - 3 * p2[axis] + p3[axis]) * t3
                    )
                    for axis in (0, 1)
                )
            )
    return curve


def _to_canvas(points: Sequence[Point], scale: float = 1.0, shift: Point = (0.0, 0.0)) -> list[Point]:
    cx, cy = 0.5, 0.5
    return [
        ((cx + (x - cx) * scale + shift[0]) * CANVAS, (cy + (y - cy) * scale + shift[1]) * CANVAS)
        for x, y in points
    ]


def _lung_outlines(scale: float = 1.0, shift: Point = (0.0, 0.0)) -> list[list[Point]]:
    right = _catmull_rom(RIGHT_LUNG)
    left = [(1.0 - x, y) for x, y in right]
    return [_to_canvas(right, scale, shift), _to_canvas(left, scale, shift)]


def _lung_mask(scale: float = 1.0, shift: Point = (0.0, 0.0)) -> Image.Image:
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    for outline in _lung_outlines(scale, shift):
        draw.polygon(outline, fill=255)
    return mask


def _background() -> Image.Image:
    """A rounded square with a vertical gradient."""
    gradient = Image.new("RGBA", (CANVAS, CANVAS))
    pixels = gradient.load()
    for y in range(CANVAS):
        t = y / (CANVAS - 1)
        colour = tuple(int(round(a + (b - a) * t)) for a, b in zip(BACKGROUND_TOP, BACKGROUND_BOTTOM)) + (255,)
        for x in range(CANVAS):
            pixels[x, y] = colour
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(mask).rounded_rectangle(
        (2 * SCALE, 2 * SCALE, CANVAS - 2 * SCALE, CANVAS - 2 * SCALE), radius=22 * SCALE, fill=255
    )
    image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    image.paste(gradient, (0, 0), mask)
    return image


def _draw_lungs(image: Image.Image, scale: float = 1.0, shift: Point = (0.0, 0.0)) -> Image.Image:
    """Lungs with a soft inner shade, plus trachea and main bronchi."""
    mask = _lung_mask(scale, shift)
    shade = Image.new("RGBA", image.size, LUNG_SHADE + (255,))
    fill = Image.new("RGBA", image.size, LUNG + (255,))
    inner = mask.filter(ImageFilter.GaussianBlur(6 * SCALE))
    lung = Image.composite(fill, shade, inner)
    image.paste(lung, (0, 0), mask)

    draw = ImageDraw.Draw(image)
    width = int(5 * SCALE * scale)
    top, carina = (0.5, 0.07), (0.5, 0.36)
    branches = [(0.5, 0.36), (0.41, 0.47)], [(0.5, 0.36), (0.59, 0.47)]
    trachea = _to_canvas([top, carina], scale, shift)
    draw.line(trachea, fill=AIRWAY, width=width)
    for branch in branches:
        draw.line(_to_canvas(branch, scale, shift), fill=AIRWAY, width=int(width * 0.8), joint="curve")
    radius = width / 2
    for x, y in trachea[:1]:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=AIRWAY)
    return image


def _noise_layer(mask: Image.Image, seed: int, density: float = 0.35) -> Image.Image:
    """Speckle noise (the "diffusion" look) confined to ``mask``."""
    rng = random.Random(seed)
    layer = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cell = 3 * SCALE
    for y in range(0, CANVAS, cell):
        for x in range(0, CANVAS, cell):
            if rng.random() < density:
                level = rng.randint(40, 255)
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(level, level, level, 255))
    clipped = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    clipped.paste(layer, (0, 0), ImageChops.multiply(mask, layer.getchannel("A")))
    return clipped


def _finish(image: Image.Image) -> Image.Image:
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def draw_extension_icon() -> Image.Image:
    """Lungs that emerge from noise: the left half still noisy, as in a diffusion model."""
    image = _draw_lungs(_background())
    half = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(half).rectangle((0, 0, CANVAS // 2, CANVAS), fill=255)
    region = ImageChops.multiply(_lung_mask(), half)
    image.alpha_composite(_noise_layer(region, seed=7, density=0.45))
    return _finish(image)


def draw_segmentation_icon() -> Image.Image:
    image = _draw_lungs(_background())
    # A coloured segment (a lesion-like blob) in the patient's left lung, with a bright outline.
    blob = _to_canvas(_catmull_rom([(0.62, 0.52), (0.72, 0.50), (0.78, 0.60), (0.72, 0.70), (0.62, 0.66)]))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.polygon(blob, fill=SEGMENT + (200,))
    draw.line(blob + blob[:1], fill=(200, 255, 220, 255), width=2 * SCALE, joint="curve")
    # A second segment: the right lower lobe tinted.
    lobe = Image.new("L", image.size, 0)
    ImageDraw.Draw(lobe).polygon(_to_canvas([(0.0, 0.62), (0.5, 0.70), (0.5, 1.0), (0.0, 1.0)]), fill=110)
    lobe = ImageChops.multiply(lobe, _lung_mask())
    tint = Image.new("RGBA", image.size, (80, 140, 255, 255))
    image.paste(tint, (0, 0), lobe)
    image.alpha_composite(overlay)
    return _finish(image)


def draw_enhance_icon() -> Image.Image:
    image = _draw_lungs(_background())
    half = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(half).rectangle((0, 0, CANVAS // 2 - SCALE, CANVAS), fill=255)
    region = ImageChops.multiply(_lung_mask(), half)
    image.alpha_composite(_noise_layer(region, seed=11, density=0.6))
    draw = ImageDraw.Draw(image)
    draw.line(((CANVAS / 2, 0.10 * CANVAS), (CANVAS / 2, 0.92 * CANVAS)), fill=ACCENT, width=2 * SCALE)
    # A four-pointed sparkle on the clean side.
    cx, cy, r = 0.80 * CANVAS, 0.22 * CANVAS, 0.11 * CANVAS
    sparkle = [
        (cx, cy - r), (cx + r * 0.22, cy - r * 0.22), (cx + r, cy), (cx + r * 0.22, cy + r * 0.22),
        (cx, cy + r), (cx - r * 0.22, cy + r * 0.22), (cx - r, cy), (cx - r * 0.22, cy - r * 0.22),
    ]
    draw.polygon(sparkle, fill=ACCENT)
    return _finish(image)


def draw_train_icon() -> Image.Image:
    image = _draw_lungs(_background(), scale=0.78, shift=(0.0, -0.04))
    draw = ImageDraw.Draw(image)
    # A circular arrow around the lungs: learning from corrected annotations, again and again.
    box = (0.08 * CANVAS, 0.08 * CANVAS, 0.92 * CANVAS, 0.92 * CANVAS)
    draw.arc(box, start=-60, end=220, fill=ACCENT, width=6 * SCALE)
    angle = math.radians(-60)
    cx = cy = CANVAS / 2
    radius = 0.42 * CANVAS - 3 * SCALE
    tip_x, tip_y = cx + radius * math.cos(angle), cy + radius * math.sin(angle)
    # Arrow head pointing along the arc's direction of travel (clockwise in image coordinates).
    tangent = angle + math.pi / 2
    head = 14 * SCALE
    back = (tip_x - head * math.cos(tangent), tip_y - head * math.sin(tangent))
    normal = (math.cos(angle), math.sin(angle))
    draw.polygon(
        [
            (tip_x + head * 0.3 * math.cos(tangent), tip_y + head * 0.3 * math.sin(tangent)),
            (back[0] + normal[0] * head * 0.7, back[1] + normal[1] * head * 0.7),
            (back[0] - normal[0] * head * 0.7, back[1] - normal[1] * head * 0.7),
        ],
        fill=ACCENT,
    )
    return _finish(image)


ICONS: dict[str, Callable[[], Image.Image]] = {
    "Resources/Icons/LCTfound.png": draw_extension_icon,
    "LCTfoundSegmentation/Resources/Icons/LCTfoundSegmentation.png": draw_segmentation_icon,
    "LCTfoundEnhance/Resources/Icons/LCTfoundEnhance.png": draw_enhance_icon,
    "LCTfoundTrain/Resources/Icons/LCTfoundTrain.png": draw_train_icon,
}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed icons")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)

    stale = []
    for relative, draw in ICONS.items():
        path = args.root / relative
        image = draw()
        if args.check:
            if not path.exists() or Image.open(path).convert("RGBA").tobytes() != image.tobytes():
                stale.append(relative)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(image))
        print(f"wrote {relative} ({image.width}x{image.height})")
    if stale:
        print("icons differ from the drawing: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
