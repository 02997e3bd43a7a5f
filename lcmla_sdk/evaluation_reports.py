"""What ``lcmla eval`` writes from its scores: per-image CSV, JSON summary, Markdown table, contact sheets."""

from __future__ import annotations

import csv
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

SHEET_CELL = 192  # contact-sheet thumbnail side, pixels
BACKGROUND, TEXT = (255, 255, 255), (0, 0, 0)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One row per image; empty cells where a value does not exist (no face found, no CLIP)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def write_json(document: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def markdown_table(method: str, summary: dict[str, Any], recognizers: Sequence[str], with_clip: bool) -> str:
    """The paper's layout: one row per method and mode; ID per recognizer with its detection rate, CLIP-T, CLIP-I."""
    header = ["Method", "Mode"]
    for label in recognizers:
        header += [f"ID ({label}) ↑", f"Face found ({label})"]
    header += ["CLIP-T ↑", "CLIP-I", "Images"] if with_clip else ["Images"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, entry in summary.items():
        cells = [method, mode]
        for label in recognizers:
            found = entry["id"][label]
            rate = f"{found['faces_found']}/{entry['images']} ({found['detection_rate']:.0%})"
            cells += [_number(found["mean"], 3), rate]
        if with_clip:
            cells += [_number(entry["clip_t"]["mean"], 2), _number(entry["clip_i"]["mean"], 2)]
        cells.append(str(entry["images"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def thumbnail(image: Image.Image, cell: int = SHEET_CELL) -> Image.Image:
    """``image`` scaled to fit a ``cell`` square, centred on the background."""
    return ImageOps.pad(image.convert("RGB"), (cell, cell), method=Image.Resampling.BICUBIC, color=BACKGROUND)


def contact_sheet(
    face: Image.Image,
    rows: Sequence[Sequence[Image.Image]],
    row_titles: Sequence[str],
    column_titles: Sequence[str],
    cell: int = SHEET_CELL,
) -> Image.Image:
    """A grid of ``cell`` squares, ``1 + len(rows)`` rows by ``1 + len(column_titles)`` columns.

    Row 0: the input ``face``, then each column's title (mode and seed). Row ``r`` >= 1: the text of
    ``row_titles[r - 1]`` (the prompt), then ``rows[r - 1]``, the images of that prompt, one per column.
    """
    sheet = Image.new("RGB", ((1 + len(column_titles)) * cell, (1 + len(rows)) * cell), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    sheet.paste(thumbnail(face, cell), (0, 0))
    for column, title in enumerate(column_titles, start=1):
        draw.multiline_text((column * cell + 8, cell // 2 - 8), title, fill=TEXT)
    wrap = max(8, cell // 7)  # characters per line of Pillow's default font
    for row, (title, images) in enumerate(zip(row_titles, rows), start=1):
        draw.multiline_text((8, row * cell + 8), "\n".join(textwrap.wrap(title, wrap)), fill=TEXT)
        for column, image in enumerate(images, start=1):
            sheet.paste(thumbnail(image, cell), (column * cell, row * cell))
    return sheet
