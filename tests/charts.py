"""Reading back the charts the package writes: a real PNG, its size, the colours drawn in it, the
program that wrote it."""

from __future__ import annotations

import io
import struct

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


def png_text(data: bytes) -> dict[str, str]:
    """The PNG's tEXt chunks (keyword → text): matplotlib signs what it writes under "Software"."""
    assert data.startswith(PNG_SIGNATURE)
    found, at = {}, len(PNG_SIGNATURE)
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"tEXt":
            keyword, _, text = data[at + 8:at + 8 + length].partition(b"\0")
            found[keyword.decode("latin-1")] = text.decode("latin-1")
        at += 12 + length
    return found


def colour(name: str) -> tuple[int, int, int]:
    """The RGB of one of the chart palette's colours, by the name the legends use."""
    return tuple(round(255 * c) for c in to_rgb(chart.COLOURS[name]))
