"""Line charts as PNG with the standard library alone (zlib for the image data, a 5x7 bitmap font
for the labels): matplotlib is not among the host's requirements, and two charts do not need it."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

# 5x7 glyphs, one int per row, the high bit of 5 on the left.
FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 12, 12), "-": (0, 0, 0, 31, 0, 0, 0), "/": (0, 1, 2, 4, 8, 16, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), ":": (0, 12, 12, 0, 12, 12, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), ",": (0, 0, 0, 0, 12, 4, 8), "_": (0, 0, 0, 0, 0, 0, 31),
    "=": (0, 0, 31, 0, 31, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0)
}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207),
          (140, 86, 75), (227, 119, 194)]
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * (width * height))

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            at = 3 * (y * self.width + x)
            self.pixels[at:at + 3] = bytes(color)

    def box(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.dot(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for step in range(steps + 1):
            x = round(x0 + (x1 - x0) * step / steps)
            y = round(y0 + (y1 - y0) * step / steps)
            self.box(x - width // 2, y - width // 2, x + (width - 1) // 2, y + (width - 1) // 2, color)

    def text(self, x: int, y: int, text: str, color=BLACK, scale: int = 1) -> int:
        """Draw ``text`` with its top-left at x, y; returns the x after it."""
        for char in text.upper():
            for row, bits in enumerate(FONT.get(char, FONT[" "])):
                for column in range(5):
                    if bits & (16 >> column):
                        self.box(x + column * scale, y + row * scale, x + column * scale + scale - 1,
                                 y + row * scale + scale - 1, color)
            x += 6 * scale
        return x

    def png(self) -> bytes:
        return encode(self.width, self.height, [self.pixels[3 * self.width * y:3 * self.width * (y + 1)]
                                                for y in range(self.height)])


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step) + 1)]


def _label(value: float) -> str:
    if value >= 10000:
        return f"{value / 1000:.0f}K"
    return f"{value:g}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"


def line_chart(path: Path, title: str, x_label: str, y_label: str,
               series: dict[str, list[tuple[float, float]]], log_x: bool = True) -> Path:
    """One chart: a line with points per series, x on a log2 scale (concurrency 1, 2, 4, ...)."""
    width, height, left, right, top, bottom = 760, 460, 80, 200, 40, 60
    canvas = Canvas(width, height)
    points = [(x, y) for line in series.values() for x, y in line if y is not None and not math.isnan(y)]
    xs = [x for x, _ in points] or [1]
    ys = [y for _, y in points] or [1]
    fx = (lambda x: math.log2(x)) if log_x else (lambda x: x)
    x_low, x_high = fx(min(xs)), fx(max(xs))
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_ticks = _ticks(0.0, max(ys) * 1.1 or 1.0)
    y_high = y_ticks[-1] if y_ticks[-1] >= max(ys) else max(ys)
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x_low) / (x_high - x_low) * plot_w, top + plot_h - y / y_high * plot_h)

    canvas.text(left, 12, title, scale=2)
    for tick in y_ticks:
        _, y = at(min(xs), tick)
        canvas.line(left, y, left + plot_w, y, GREY)
        label = _label(tick)
        canvas.text(left - 8 - 6 * len(label), int(y) - 3, label)
    for x_value in sorted(set(xs)):
        x, _ = at(x_value, 0)
        canvas.line(x, top + plot_h, x, top + plot_h + 4, BLACK)
        label = _label(x_value)
        canvas.text(int(x) - 3 * len(label), top + plot_h + 8, label)
    canvas.line(left, top, left, top + plot_h, BLACK)
    canvas.line(left, top + plot_h, left + plot_w, top + plot_h, BLACK)
    canvas.text(left + plot_w // 2 - 3 * len(x_label), height - 24, x_label)
    canvas.text(8, top - 14, y_label)
    for index, (name, line) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        drawn = [at(x, y) for x, y in sorted(line) if y is not None and not math.isnan(y)]
        for (x0, y0), (x1, y1) in zip(drawn, drawn[1:], strict=False):
            canvas.line(x0, y0, x1, y1, color, width=2)
        for x, y in drawn:
            canvas.box(int(x) - 3, int(y) - 3, int(x) + 3, int(y) + 3, color)
        key_y = top + 10 + 16 * index
        canvas.box(left + plot_w + 12, key_y, left + plot_w + 24, key_y + 6, color)
        canvas.text(left + plot_w + 30, key_y, name[:27])
    path.write_bytes(canvas.png())
    return path


def encode(width: int, height: int, rows) -> bytes:
    """An 8-bit RGB PNG of ``height`` rows, each ``width`` x 3 bytes (the one encoder charts use)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))
