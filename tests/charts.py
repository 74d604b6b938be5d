"""Reading back the charts the package writes: a real PNG, its size, the colours drawn in it."""

from __future__ import annotations

import io

from matplotlib.colors import to_rgb
from matplotlib.image import imread

from trtllm_deploy.measure import chart

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(data: bytes) -> tuple[tuple[int, int], set[tuple[int, int, int]]]:
    """(width, height) and every RGB colour a decoder finds in it."""
    assert data.startswith(PNG_SIGNATURE)
    pixels = imread(io.BytesIO(data), format="png")
    height, width = pixels.shape[:2]
    rgb = (pixels[..., :3] * 255).round().astype(int).reshape(-1, 3)
    return (width, height), {tuple(int(c) for c in colour) for colour in set(map(tuple, rgb))}


def colour(name: str) -> tuple[int, int, int]:
    """The RGB of one of the chart palette's colours, by the name the legends use."""
    return tuple(round(255 * c) for c in to_rgb(chart.COLOURS[name]))
