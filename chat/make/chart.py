"""The loss curve: a few lines of text for the terminal, and a picture in the card folder.

The picture is a PNG when matplotlib is installed; otherwise a small SVG written by hand
(matplotlib is a large dependency to take on for one chart, and an SVG opens in any browser).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

BLOCKS = " ▁▂▃▄▅▆▇█"


def text_chart(
    train: Sequence[float],
    held: Sequence[tuple[int, float]],
    width: int = 60,
    height: int = 6,
) -> list[str]:
    """Rows of a column chart of the training loss (█) with the held-out losses marked (●), top row first."""
    if not train:
        return []
    step = max(1, -(-len(train) // width))
    cols = [sum(train[i : i + step]) / len(train[i : i + step]) for i in range(0, len(train), step)]
    marks = {min(len(cols) - 1, (s - 1) // step): v for s, v in held}
    values = cols + list(marks.values())
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    rows = []
    for r in range(height - 1, -1, -1):
        line = []
        for c, v in enumerate(cols):
            level = (v - lo) / span * height - r
            cell = BLOCKS[max(0, min(8, round(level * 8)))]
            held_v = marks.get(c)
            if held_v is not None and int(min(height - 1, (held_v - lo) / span * height)) == r:
                cell = "●"
            line.append(cell)
        label = f"{hi:7.3f} ┤" if r == height - 1 else f"{lo:7.3f} ┤" if r == 0 else "        │"
        rows.append(label + "".join(line))
    rows.append(f"        └{'─' * len(cols)} step 1…{len(train)}  (█ training loss, ● held-out)")
    return rows


def write_curve(folder: Path, train: Sequence[float], held: Sequence[tuple[int, float]]) -> Path:
    """``loss.png`` (matplotlib) or ``loss.svg`` (by hand) in ``folder``; the path written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _write_svg(folder / "loss.svg", train, held)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(train) + 1), train, label="training loss")
    if held:
        ax.plot([s for s, _ in held], [v for _, v in held], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    path = folder / "loss.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def _write_svg(path: Path, train: Sequence[float], held: Sequence[tuple[int, float]]) -> Path:
    w, h, pad = 600, 320, 40
    values = list(train) + [v for _, v in held] or [0.0]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = max(len(train), 2)

    def xy(step: float, v: float) -> str:
        return f"{pad + (step - 1) / (n - 1) * (w - 2 * pad):.1f},{h - pad - (v - lo) / span * (h - 2 * pad):.1f}"

    line = " ".join(xy(i + 1, v) for i, v in enumerate(train))
    dots = "".join(
        f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="3" fill="#d62728"/>' for s, v in held
    )
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<path d="M{pad},{pad}V{h - pad}H{w - pad}" stroke="black" fill="none"/>'
        f'<polyline points="{line}" stroke="#1f77b4" fill="none" stroke-width="1.5"/>{dots}'
        f'<text x="{pad}" y="{pad - 10}">loss {hi:.3f} (top) … {lo:.3f} (bottom)</text>'
        f'<text x="{w - pad}" y="{h - 12}" text-anchor="end">step 1…{len(train)}</text>'
        f'<text x="{w - pad}" y="{pad - 10}" text-anchor="end" fill="#1f77b4">training</text>'
        f'<text x="{w - pad - 70}" y="{pad - 10}" text-anchor="end" fill="#d62728">● held-out</text></svg>\n',
        encoding="utf-8",
    )
    return path
