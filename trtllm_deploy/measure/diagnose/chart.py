"""Line charts as PNG with the standard library alone (matplotlib is not in requirements/host.txt).

No text is drawn: the caller prints the legend (series → colour) beside the file's path.
"""

from __future__ import annotations

from trtllm_deploy.measure.bench.png import encode

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
COLOUR_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")
_AXIS = (0, 0, 0)
_GRID = (225, 225, 225)


def png(width: int, height: int, pixels: list[bytearray]) -> bytes:
    """An RGB PNG of ``height`` rows of ``width`` × 3 bytes."""
    return encode(width, height, pixels)


class Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.rows = [bytearray(b"\xff" * width * 3) for _ in range(height)]

    def dot(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.rows[y][3 * x:3 * x + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour, thick: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            for dy in range(thick):
                self.dot(x, y + dy, colour)

    def encode(self) -> bytes:
        return png(self.width, self.height, self.rows)


def panels(series_by_panel: list[dict[str, list[tuple[float, float | None]]]], *, width: int = 800,
           panel_height: int = 160, margin: int = 12) -> tuple[bytes, dict[str, str]]:
    """One panel per metric stacked vertically; each panel's series ``name → [(t, value)]`` drawn in
    the palette's colours, the same name the same colour in every panel. Gaps (None) break the line.
    Returns the PNG and the legend ``name → colour``."""
    names: list[str] = []
    for panel in series_by_panel:
        names += [name for name in panel if name not in names]
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    canvas = Canvas(width, panel_height * max(1, len(series_by_panel)))
    for index, panel in enumerate(series_by_panel):
        top = index * panel_height + margin
        bottom = (index + 1) * panel_height - margin
        left, right = margin, width - margin
        points = [(t, v) for series in panel.values() for t, v in series if v is not None]
        for y in (top, (top + bottom) // 2, bottom):
            canvas.line(left, y, right, y, _GRID)
        canvas.line(left, top, left, bottom, _AXIS)
        canvas.line(left, bottom, right, bottom, _AXIS)
        if not points:
            continue
        t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
        v1 = max(max(v for _, v in points), 1e-9)  # from zero: utilisation and power read honestly

        span = (t1 - t0) or 1
        for name, series in panel.items():
            previous = None
            for t, v in series:
                if v is None:
                    previous = None
                    continue
                here = (left + round((t - t0) / span * (right - left)),
                        bottom - round(v / v1 * (bottom - top)))
                if previous:
                    canvas.line(*previous, *here, colour[name], thick=2)
                else:
                    canvas.dot(*here, colour[name])
                previous = here
    legend = {name: COLOUR_NAMES[PALETTE.index(rgb)] for name, rgb in colour.items()}
    return canvas.encode(), legend
