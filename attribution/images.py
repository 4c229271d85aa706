"""Pictures for people: image grids and small charts as PNG bytes (rendered in the Dagster UI as metadata)."""
from __future__ import annotations

import io

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def image_grid(rows: list[np.ndarray], scale: int = 4, pad: int = 2) -> bytes:
    """PNG of rows of images (each row an (N, C, H, W) array in [-1, 1]); short rows are left blank at the end."""
    from PIL import Image

    width = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    canvas = np.full(((h + pad) * len(rows) + pad, (w + pad) * width + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(to_uint8(row)):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img if c == 3 else np.repeat(img, 3, axis=2)
    pil = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(df, x: str, y: str, low: str, high: str, hue: str, ceiling: str | None = None,
              title: str = "") -> bytes:
    """Grouped bars with interval whiskers (one colour per `hue`), and an optional dashed ceiling per hue."""
    plt = _pyplot()
    cats = list(dict.fromkeys(df[x]))
    hues = list(dict.fromkeys(df[hue]))
    width = 0.8 / max(len(hues), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(cats) + 2), 3.4), dpi=90)
    for h_i, h in enumerate(hues):
        sub = df[df[hue] == h].set_index(x).reindex(cats)
        pos = np.arange(len(cats)) + (h_i - (len(hues) - 1) / 2) * width
        err = np.vstack([sub[y] - sub[low], sub[high] - sub[y]]).clip(min=0)
        bars = ax.bar(pos, sub[y], width, yerr=err, capsize=3, label=str(h))
        if ceiling is not None and sub[ceiling].notna().any():
            ax.axhline(float(sub[ceiling].dropna().iloc[0]), ls="--", lw=1, color=bars.patches[0].get_facecolor(),
                       label=f"noise ceiling ({h})")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(np.arange(len(cats)), cats, rotation=20)
    ax.set(title=title, ylabel=y)
    ax.legend(fontsize=7)
    return _figure_png(fig)


def line_chart(y: np.ndarray, title: str, xlabel: str, ylabel: str, smooth: int = 1) -> bytes:
    plt = _pyplot()
    y = np.asarray(y, dtype=np.float64)
    if smooth > 1 and len(y) >= smooth:
        y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    ax.plot(np.arange(len(y)) + (smooth if smooth > 1 else 0), y)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def multi_line_chart(table, title: str, xlabel: str, ylabel: str) -> bytes:
    """One line per column of a DataFrame indexed by x (e.g. each group's estimate vs number of coalitions)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    for col in table.columns:
        ax.plot(table.index, table[col], marker=".", label=str(col))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _figure_png(fig)
