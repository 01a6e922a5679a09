"""Small text helpers shared by the report and the dry run's table."""
from __future__ import annotations

import textwrap


def percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal that never rounds a loss up to 100.0%."""
    text = f"{fraction:.1%}"
    if text == "100.0%" and fraction < 1:
        text = f"{fraction:.2%}" if f"{fraction:.2%}" != "100.00%" else ">99.99%"
    return text


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def chain_label(names: list[str], most: int = 6) -> str:
    """``a -> b -> c``; a longer chain as its first two and last names and its length, so a line
    stays short however many layers it has."""
    if len(names) <= most:
        return " -> ".join(names)
    return f"{names[0]} -> {names[1]} -> ... -> {names[-1]} ({len(names):,} layers)"


def columns(rows: list[tuple[str, ...]], pad_last: bool = False, width: int | None = None) -> list[str]:
    """Rows of cells aligned in columns (the last one left ragged unless ``pad_last``). With
    ``width``, a ragged last cell that would pass it goes on over more lines, indented to its column
    (a long reason is read whole, not cut)."""
    if not rows:
        return []
    n = len(rows[0])
    aligned = n if pad_last else n - 1
    widths = [max(len(r[i]) for r in rows) for i in range(aligned)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:aligned], widths)] + list(r[aligned:])
        line = "  ".join(cells).rstrip() if pad_last else "  ".join(cells)
        offset = len(line) - len(r[-1])
        if width is None or pad_last or len(line) <= width or width - offset < 40:
            lines.append(line)
            continue
        pieces = textwrap.wrap(r[-1], width - offset, break_long_words=False, break_on_hyphens=False)
        lines += [line[:offset] + pieces[0]] + [" " * offset + piece for piece in pieces[1:]]
    return lines
