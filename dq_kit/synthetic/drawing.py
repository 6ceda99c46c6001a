"""Colours and shapes drawn with PIL: one palette and one drawing routine for every synthetic image
dq_kit makes (the shapes dataset, the default calibration set, the tiny test images).

Example:
    >>> import PIL.Image, PIL.ImageDraw
    >>> image = PIL.Image.new("RGB", (56, 56), PALETTE["white"])
    >>> draw_shape(PIL.ImageDraw.Draw(image), "circle", (10, 10, 30, 30), PALETTE["red"])
    >>> image.getpixel((20, 20))
    (220, 40, 40)
"""

from __future__ import annotations

import PIL.ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "rectangle", "ellipse")


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    """Draw one filled ``shape`` inside ``box`` (left, top, right, bottom). Rectangles and ellipses
    take the middle half of the box's height; the triangle points up.

    Example:
        >>> import PIL.Image
        >>> image = PIL.Image.new("RGB", (8, 8))
        >>> draw_shape(PIL.ImageDraw.Draw(image), "square", (0, 0, 7, 7), PALETTE["blue"])
        >>> image.getpixel((4, 4))
        (40, 80, 220)
    """
    left, top, right, bottom = box
    band = (left, top + (bottom - top) // 4, right, top + (bottom - top) * 3 // 4)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), ((left + right) // 2, top)], fill=fill)
    elif shape == "rectangle":
        draw.rectangle(band, fill=fill)
    elif shape == "ellipse":
        draw.ellipse(band, fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose from {SHAPES}.")
