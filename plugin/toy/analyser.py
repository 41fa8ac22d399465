"""A deterministic analyser for images of the toy shapes world (pure numpy, no learned weights).

It reads back what :mod:`plugin.toy.data` draws: the background colour (from the image border), the
object (pixels far from the background), the object's colour (nearest palette colour to its
interior) and its shape (the best-matching template inside the object's bounding box). It is meant
to judge *generated* images, which are blurrier and noisier than the data, so every step is robust
rather than exact: medians, a mid-way threshold between background and object colour, the largest
connected blob, and template matching by intersection over union.

Public API:

- :func:`analyse` -> :class:`Analysis`: colour, shape and background of one image.
- :func:`parse_prompt`: the colour / shape / background words of a prompt.
- :func:`score_image`, :func:`score_images`: does an image (a set of images) follow its prompt(s)?
- :func:`analyse_subject`: is the fine-tuning subject (a yellow-and-black striped circle) there?
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import COLOURS, PALETTE, SHAPES, SUBJECT, shape_mask

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
MIN_CONTRAST = 40.0  # an object must differ from the background by this much (RGB distance)


@dataclass
class Analysis:
    """What :func:`analyse` found. ``colour``/``shape`` are ``None`` when no object was found."""

    colour: str | None
    shape: str | None
    background: str
    found: bool
    object_rgb: tuple[float, float, float] | None = None
    background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    area: float = 0.0  # object pixels / image pixels
    bbox: tuple[int, int, int, int] | None = None  # (top, left, bottom, right), exclusive end
    shape_scores: dict[str, float] = field(default_factory=dict)  # IoU with each shape template


def to_array(image) -> np.ndarray:
    """PIL image, uint8/float array (``(H, W, 3)``, 0-255) or ``(3, H, W)`` tensor in ``[-1, 1]`` /
    ``[0, 1]`` -> float32 ``(H, W, 3)`` array in 0-255."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor, CHW
        t = image.detach().float().cpu()
        t = (t + 1) / 2 if t.min() < 0 else t
        return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.float32)
    a = np.asarray(image)
    if a.dtype != np.uint8 and a.max() <= 1.0:
        a = a * 255.0
    return a.astype(np.float32)


def nearest_colour(rgb) -> str:
    """Name of the palette colour nearest to ``rgb`` (Euclidean distance in RGB)."""
    d = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    return COLOURS[int(np.argmin(d))]


def _border(img: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate(
        [
            img[:width].reshape(-1, 3),
            img[-width:].reshape(-1, 3),
            img[width:-width, :width].reshape(-1, 3),
            img[width:-width, -width:].reshape(-1, 3),
        ]
    )


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (all False if the mask is empty).

    Labels spread by repeated neighbour-minimum until nothing changes (vectorised, ~1 ms at 64x64).
    """
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    big = np.iinfo(np.int32).max
    labels = np.where(mask, np.arange(mask.size, dtype=np.int32).reshape(mask.shape), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def shape_scores(mask: np.ndarray) -> tuple[dict[str, float], tuple[int, int, int, int]]:
    """IoU of ``mask`` with each shape of :data:`SHAPES` drawn in the mask's bounding box.

    Also returns the bounding box ``(top, left, bottom, right)``.
    """
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    w, h = right - left, bottom - top
    # compare on a square window around the box, so templates are drawn on few pixels
    side = max(w, h) + 2
    y0, x0 = top - (side - h) // 2, left - (side - w) // 2
    window = np.zeros((side, side), dtype=np.float32)
    sy, sx = max(0, -y0), max(0, -x0)
    crop = mask[max(0, y0) : y0 + side, max(0, x0) : x0 + side]
    window[sy : sy + crop.shape[0], sx : sx + crop.shape[1]] = crop
    centre = ((left + right) / 2.0 - x0, (top + bottom) / 2.0 - y0)
    scores = {}
    for s in SHAPES:
        tmpl = shape_mask(s, centre, float(w), side, supersample=2, aspect=h / w)
        scores[s] = float(np.minimum(window, tmpl).sum() / max(np.maximum(window, tmpl).sum(), 1e-6))
    return scores, (top, left, bottom, right)


def analyse(image) -> Analysis:
    """Background colour, object colour and object shape of one toy-world image.

    1. background = per-channel median of a 2-pixel border;
    2. object colour estimate = median of the pixels farthest from the background;
    3. object mask = pixels more than half-way from the background to the object colour (the
       right edge for a blurred boundary), largest connected blob;
    4. colour = nearest palette colour to the median of the mask's interior;
    5. shape = the template (circle, square, triangle, diamond) with the highest IoU in the
       blob's bounding box.
    """
    img = to_array(image)
    bg = np.median(_border(img), axis=0)
    background = nearest_colour(bg)
    dist = np.linalg.norm(img - bg, axis=-1)
    far = np.percentile(dist, 99.5)
    if far < MIN_CONTRAST:
        return Analysis(None, None, background, False, background_rgb=tuple(map(float, bg)))
    core = dist >= 0.7 * far
    obj = np.median(img[core], axis=0)
    direction = obj - bg
    t = (img - bg) @ direction / float(direction @ direction)
    mask = largest_component((t > 0.5) & (dist > MIN_CONTRAST / 2))
    if mask.sum() < 4:
        return Analysis(None, None, background, False, background_rgb=tuple(map(float, bg)))
    interior = _erode(mask)
    pixels = img[interior] if interior.sum() >= 4 else img[mask]
    rgb = np.median(pixels, axis=0)
    scores, bbox = shape_scores(mask)
    return Analysis(
        colour=nearest_colour(rgb),
        shape=max(scores, key=scores.get),
        background=background,
        found=True,
        object_rgb=tuple(map(float, rgb)),
        background_rgb=tuple(map(float, bg)),
        area=float(mask.mean()),
        bbox=bbox,
        shape_scores=scores,
    )


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """``{"colour", "shape", "background"}`` named by a prompt such as
    ``"a red circle on a blue background"`` (``None`` where the prompt does not say)."""
    words = prompt.lower().replace(",", " ").split()
    out: dict[str, str | None] = {"colour": None, "shape": None, "background": None}
    if "on" in words:
        cut = len(words) - 1 - words[::-1].index("on")
        obj_words, bg_words = words[:cut], words[cut + 1 :]
    else:
        obj_words, bg_words = words, []
    out["shape"] = next((w for w in obj_words if w in SHAPES), None)
    out["colour"] = next((w for w in obj_words if w in PALETTE), None)
    out["background"] = next((w for w in bg_words if w in PALETTE), None)
    return out


def score_image(image, prompt: str | dict) -> dict[str, bool | None]:
    """Does ``image`` follow ``prompt`` (a string, or a dict with colour/shape/background)?

    Returns ``{"colour", "shape", "background"}`` booleans, ``None`` for what the prompt leaves open.
    """
    want = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    got = analyse(image)
    return {
        k: (None if want.get(k) is None else getattr(got, k) == want[k])
        for k in ("colour", "shape", "background")
    }


def score_images(images, prompts) -> dict[str, float]:
    """Accuracy of colour, shape, background and all three together over paired images/prompts."""
    rows = [score_image(im, p) for im, p in zip(images, prompts, strict=True)]
    out = {}
    for key in ("colour", "shape", "background"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    out["all"] = float(np.mean([all(v for v in r.values() if v is not None) for r in rows]))
    out["n"] = len(rows)
    return out


def analyse_subject(image) -> dict:
    """Does the image show the fine-tuning subject, a circle with yellow and black stripes?

    Returns ``{"found", "shape", "stripe_fraction", "transitions", "is_subject"}``: the object's
    pixels are split by nearest stripe colour; ``stripe_fraction`` is the smaller of the two
    colours' shares of the object, ``transitions`` the number of colour changes down its middle
    column. ``is_subject`` needs a circle, both colours (>= 20% each) and at least 2 changes.
    """
    img = to_array(image)
    bg = np.median(_border(img), axis=0)
    mask = largest_component(np.linalg.norm(img - bg, axis=-1) > 60.0)
    if mask.sum() < 16:
        return {"found": False, "shape": None, "stripe_fraction": 0.0, "transitions": 0, "is_subject": False}
    a, b = (np.asarray(PALETTE[c], dtype=np.float32) for c in SUBJECT["stripe_colours"])
    is_a = np.linalg.norm(img - a, axis=-1) < np.linalg.norm(img - b, axis=-1)
    share_a = float(is_a[mask].mean())
    scores, (top, left, bottom, right) = shape_scores(mask)
    column = (left + right) // 2
    seq = [bool(is_a[y, column]) for y in range(top, bottom) if mask[y, column]]
    transitions = int(sum(x != y for x, y in zip(seq, seq[1:])))
    shape = max(scores, key=scores.get)
    stripe_fraction = min(share_a, 1 - share_a)
    return {
        "found": True,
        "shape": shape,
        "stripe_fraction": stripe_fraction,
        "transitions": transitions,
        "is_subject": shape == SUBJECT["shape"] and stripe_fraction >= 0.2 and transitions >= 2,
    }
