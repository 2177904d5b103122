"""Procedural shapes data set: one coloured shape on a plain background, with its caption. No downloads.

Images are 64x64 RGB (B, H, W, 3) float32 in [0, 1]: a circle, square or (upward) triangle in one of 8 colours on
a background of another colour, with random size, position and a small colour jitter; edges are anti-aliased by
drawing at 4x and averaging. Captions are exactly `a {colour} {shape} on a {background} background`.

The 3 * 8 * 7 = 168 (shape, colour, background) combinations are split once, deterministically: `HELD_OUT`
(~20%, never drawn for training) and `TRAIN`. A batch is a pure function of (seed, step), so a resumed training
run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], np.float32) / 255.0  # (8, 3)
IMAGE_SIZE = 64
JITTER = 12 / 255  # per-channel colour jitter

ALL_COMBOS = tuple((s, c, b) for s, c, b in itertools.product(SHAPES, COLOUR_NAMES, COLOUR_NAMES) if c != b)


def _split(fraction: float = 0.2, seed: int = 0):
    """Hold out `fraction` of the combinations, chosen so that every (shape, colour), (shape, background) and
    (colour, background) pair of a held-out combination still appears in training: the model must compose
    known parts, not see new words."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ALL_COMBOS))
    want = int(round(fraction * len(ALL_COMBOS)))
    held: list[tuple] = []
    train = set(ALL_COMBOS)
    for i in order:
        combo = ALL_COMBOS[i]
        rest = train - {combo}
        s, c, b = combo
        if (any(x[:2] == (s, c) for x in rest) and any((x[0], x[2]) == (s, b) for x in rest)
                and any(x[1:] == (c, b) for x in rest)):
            held.append(combo)
            train = rest
        if len(held) == want:
            break
    return tuple(sorted(train, key=ALL_COMBOS.index)), tuple(sorted(held, key=ALL_COMBOS.index))


TRAIN, HELD_OUT = _split()


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(shape, colour, background) of a caption in this data set's format, else None."""
    words = text.strip().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        return None
    return shape, colour, background


def _masks(shape_idx, cx, cy, r, size, oversample=4):
    """(B, size, size) coverage in [0, 1] of each shape, anti-aliased by `oversample`^2 samples per pixel."""
    n = size * oversample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / oversample
    yy, xx = coords[None, :, None], coords[None, None, :]
    cx, cy, r = (a[:, None, None].astype(np.float32) for a in (cx, cy, r))
    dx, dy = xx - cx, yy - cy
    circle = dx * dx + dy * dy <= r * r
    square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # upward isosceles triangle with base 2r (at y = cy + r) and height 2r
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    triangle = (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    k = shape_idx[:, None, None]
    m = np.where(k == 0, circle, np.where(k == 1, square, triangle)).astype(np.float32)
    return m.reshape(-1, size, oversample, size, oversample).mean(axis=(2, 4))


def render(shapes, colours, backgrounds, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Images (B, size, size, 3) float32 in [0, 1] for the given names, with random size/position/jitter."""
    b = len(shapes)
    shape_idx = np.asarray([SHAPES.index(s) for s in shapes])
    fg = PALETTE[[COLOUR_NAMES.index(c) for c in colours]]
    bg = PALETTE[[COLOUR_NAMES.index(c) for c in backgrounds]]
    r = rng.uniform(0.17, 0.3, b) * size
    cx = rng.uniform(r + 2, size - r - 2)
    cy = rng.uniform(r + 2, size - r - 2)
    fg = np.clip(fg + rng.uniform(-JITTER, JITTER, (b, 3)), 0, 1)
    bg = np.clip(bg + rng.uniform(-JITTER, JITTER, (b, 3)), 0, 1)
    m = _masks(shape_idx, cx, cy, r, size)[..., None]
    return (m * fg[:, None, None] + (1 - m) * bg[:, None, None]).astype(np.float32)


def sample_combos(rng: np.random.Generator, n: int, combos=TRAIN) -> list[tuple[str, str, str]]:
    return [combos[i] for i in rng.integers(0, len(combos), n)]


def batch(seed: int, step: int, batch_size: int, combos=TRAIN, size: int = IMAGE_SIZE) -> dict:
    """Training batch `step` of a run: {"images": (B, size, size, 3) in [-1, 1], "captions": [str] * B}.
    A pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    picked = sample_combos(rng, batch_size, combos)
    images = render(*zip(*picked), rng=rng, size=size)
    return {"images": images * 2 - 1, "captions": [caption(*c) for c in picked]}


def synthetic_batches(seed: int, batch_size: int, combos=TRAIN, size: int = IMAGE_SIZE):
    """step -> batch function for `sdjax.train` (the shapes data set)."""
    return lambda step: batch(seed, step, batch_size, combos, size)


# ----------------------------------------------------------------------------------------------------------------
# A folder of images + captions.jsonl (fine-tuning on one's own pictures)


def read_caption_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """`captions.jsonl` in `folder`: one {"file": "name.png", "caption": "..."} (or "text") per line."""
    folder = Path(folder)
    index = folder / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no captions.jsonl (one {{\"file\": ..., \"caption\": ...}} per line)")
    items = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file"], row.get("caption", row.get("text"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}:{n}: expected {{\"file\": ..., \"caption\": ...}}") from None
        if not isinstance(text, str):
            raise ValueError(f"{index}:{n}: no caption")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{index}:{n}: \"file\" must be a file name, got {name!r}")
        path = folder / name
        # the data set is the folder: no absolute paths, no ../, no symlinks leading out of it
        if Path(name).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{index}:{n}: {name!r} is outside {folder}; list files inside the data folder")
        if not path.is_file():
            raise FileNotFoundError(f"{index}:{n}: {path}: no such file")
        items.append((path, text))
    if not items:
        raise ValueError(f"{index}: no images listed")
    return items


def folder_batches(folder: str | Path, seed: int, batch_size: int, size: int):
    """step -> batch function over a captioned image folder (images resized and centre-cropped to `size`)."""
    from PIL import Image

    items = read_caption_folder(folder)
    cache: dict[int, np.ndarray] = {}

    def load(i):
        if i not in cache:
            try:
                im = Image.open(items[i][0])
                im.load()
            except (OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise ValueError(f"{items[i][0]}: not an image PIL can read ({' '.join(str(e).split())})") from None
            with im:
                im = im.convert("RGB")
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
                cache[i] = np.asarray(im, np.float32) / 127.5 - 1
        return cache[i]

    def get(step):
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, len(items), batch_size)
        return {"images": np.stack([load(i) for i in idx]), "captions": [items[i][1] for i in idx]}

    return get


# ----------------------------------------------------------------------------------------------------------------
# Procedural classifier (for evaluation; independent of any learned model)


def nearest_colour(rgb: np.ndarray) -> str:
    return COLOUR_NAMES[int(np.argmin(np.sum((PALETTE - np.asarray(rgb, np.float32)[None]) ** 2, -1)))]


def classify(image: np.ndarray) -> dict:
    """(H, W, 3) in [0, 1] (or uint8) -> {"shape", "colour", "background"} read off the pixels.

    Background: the median colour of the border pixels. Shape pixels: those far from the background colour.
    Colour: their median. Shape: how much of the bounding box they fill (square ~1, circle ~0.79, triangle ~0.5).
    """
    a = np.asarray(image, np.float32)
    if a.max() > 1.5:
        a = a / 255.0
    h, w, _ = a.shape
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.sqrt(np.sum((a - bg) ** 2, -1))
    out = {"background": nearest_colour(bg), "colour": None, "shape": None}
    loose = dist > 0.15
    if loose.sum() < 0.01 * h * w:
        return out
    # the edge is where the colour is half-way between background and shape (robust to blur and anti-aliasing);
    # rows/columns with a single stray pixel do not count towards the bounding box
    mask = dist > 0.5 * np.percentile(dist[loose], 90)
    out["colour"] = nearest_colour(np.median(a[dist > 0.75 * np.percentile(dist[loose], 90)], axis=0))
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return out
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill = box.mean()
    out["shape"] = "square" if fill > 0.89 else ("circle" if fill > 0.64 else "triangle")
    return out


__all__ = [
    "ALL_COMBOS", "COLOURS", "COLOUR_NAMES", "HELD_OUT", "IMAGE_SIZE", "PALETTE", "SHAPES", "TRAIN", "batch",
    "caption", "classify", "folder_batches", "parse_caption", "read_caption_folder", "render", "sample_combos",
    "synthetic_batches",
]
