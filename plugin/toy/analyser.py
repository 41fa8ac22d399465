"""A deterministic analyser for images of the toy world (pure numpy, no learned weights).

It reads back what :mod:`plugin.toy.data` draws: the background colour (from the image border),
the objects (blobs of pixels far from the background, at most two, named left to right), and for
each object its colours (the one or two palette colours most of its interior is nearest to), its
shape (the best-matching template in the blob's bounding box) and its pattern (the best-matching
two-colour template, allowing small shifts and either colour first). It is meant to judge
*generated* images, which are blurrier and noisier than the data, so every step is robust rather
than exact: medians, shares with thresholds, template matching by agreement.

Public API:

- :func:`analyse` -> :class:`Analysis`: background and objects of one image.
- :func:`parse_prompt`: what a prompt asks for (objects with shape, pattern, colours; background).
- :func:`score_image`, :func:`score_images`: does an image (a set of images) follow its prompt(s)?
- :func:`analyse_subject`: is a DreamBooth subject (a pattern x colours x shape) there?
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import COLOURS, NEW_SHAPES, PALETTE, PATTERNS, SHAPES, SIZES, SUBJECT, pattern_template, shape_mask

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
MIN_CONTRAST = 45.0  # an object pixel differs from the background by this much (RGB distance)
MIN_AREA = 24  # pixels: smaller blobs are noise
SECOND_COLOUR_SHARE = 0.12  # a second colour must cover this share of the object's pure pixels
PURE_PIXEL = 50.0  # a pixel this close to a palette colour shows that colour, not a blend
BLEND_DISTANCE = 40.0  # a colour this close to the segment between two others is their blend
_SHIFTS = (-2, -1, 0, 1, 2)  # pixels a generated pattern may be out of phase with the template


@dataclass
class ObjectAnalysis:
    """One object found in an image."""

    shape: str
    pattern: str
    colours: tuple[str, ...]  # one for "plain", two otherwise, in the pattern's order
    bbox: tuple[int, int, int, int]  # (top, left, bottom, right), exclusive end
    area: float  # object pixels / image pixels
    shape_scores: dict[str, float] = field(default_factory=dict)  # IoU with each shape template
    pattern_scores: dict[str, float] = field(default_factory=dict)  # agreement with each pattern


@dataclass
class Analysis:
    """What :func:`analyse` found; ``objects`` are sorted left to right (empty if none)."""

    background: str
    objects: list[ObjectAnalysis]
    background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def found(self) -> bool:
        return bool(self.objects)

    # the single-object view: the largest object
    @property
    def main(self) -> ObjectAnalysis | None:
        return max(self.objects, key=lambda o: o.area) if self.objects else None

    @property
    def shape(self) -> str | None:
        return self.main.shape if self.objects else None

    @property
    def colour(self) -> str | None:
        return self.main.colours[0] if self.objects else None

    @property
    def pattern(self) -> str | None:
        return self.main.pattern if self.objects else None


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


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, largest first.

    Labels spread by repeated neighbour-minimum until nothing changes (vectorised, ~1 ms at 64x64).
    """
    if not mask.any():
        return []
    big = np.iinfo(np.int32).max
    labels = np.where(mask, np.arange(mask.size, dtype=np.int32).reshape(mask.shape), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        h, w = mask.shape
        neighbours = [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(neighbours), big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return [labels == i for i in ids[np.argsort(-counts)]]


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background region that does not touch the image border."""
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = (
        ~mask[0, :],
        ~mask[-1, :],
        ~mask[:, 0],
        ~mask[:, -1],
    )
    while True:
        p = np.pad(outside, 1)
        grown = (outside | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]) & ~mask
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _template_frame(mask: np.ndarray) -> tuple[tuple[float, float], float, float]:
    """``(centre, width, aspect)`` of the mask's bounding box, for drawing templates over it."""
    top, left, bottom, right = _bbox(mask)
    w, h = right - left, bottom - top
    return ((left + right) / 2.0, (top + bottom) / 2.0), float(w), h / w


def shape_scores(mask: np.ndarray) -> tuple[dict[str, float], tuple[int, int, int, int]]:
    """IoU of ``mask`` with each shape of :data:`SHAPES` and :data:`NEW_SHAPES` drawn in the mask's bounding box.

    Also returns the bounding box ``(top, left, bottom, right)``.
    """
    centre, w, aspect = _template_frame(mask)
    size = mask.shape[0]
    m = mask.astype(np.float32)
    scores = {}
    for s in SHAPES + NEW_SHAPES:
        tmpl = shape_mask(s, centre, w, size, supersample=2, aspect=aspect)
        scores[s] = float(np.minimum(m, tmpl).sum() / max(np.maximum(m, tmpl).sum(), 1e-6))
    return scores, _bbox(mask)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return np.roll(np.roll(a, dy, axis=0), dx, axis=1)


def _second_colour_template(pattern: str, shape: str, mask: np.ndarray) -> np.ndarray:
    """Where ``pattern`` on ``shape``, drawn in ``mask``'s bounding box, shows its second colour."""
    centre, w, aspect = _template_frame(mask)
    cover, share = pattern_template(pattern, shape, centre, w, mask.shape[0], aspect)
    return share > 0.5 * np.maximum(cover, 1e-6)


def pattern_scores(second: np.ndarray, region: np.ndarray, shape: str, mask: np.ndarray) -> dict[str, float]:
    """Agreement of a two-colour map with each two-colour pattern of :data:`PATTERNS`.

    ``second`` is True where a pixel shows the object's second colour, ``region`` the pixels to
    compare on. Each pattern's template is drawn in ``mask``'s bounding box, shifted by up to two
    pixels and with either colour first; the best agreement counts.
    """
    scores = {}
    for pattern in PATTERNS:
        if pattern == "plain":
            continue
        tmpl = _second_colour_template(pattern, shape, mask)
        best = 0.0
        for dy in _SHIFTS:
            for dx in _SHIFTS:
                agree = float((_shift(tmpl, dy, dx) == second)[region].mean())
                best = max(best, agree, 1.0 - agree)
        scores[pattern] = best
    return scores


def _segment_distance(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    t = float(np.clip((c - a) @ (b - a) / float((b - a) @ (b - a)), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * (b - a))))


def _object_colours(pixels: np.ndarray, background: str) -> list[str]:
    """The one or two palette colours of an object's interior pixels.

    Only pixels near a palette colour count (blurred edges are blends of two colours); a third
    candidate that is a blend of two others (orange between red and yellow stripes) is dropped.
    """
    dist = np.linalg.norm(pixels[:, None] - _PALETTE_RGB[None], axis=-1)
    pure = dist.min(axis=1) < PURE_PIXEL
    if pure.sum() < 8:
        return [nearest_colour(np.median(pixels, axis=0))]
    names = np.array(COLOURS)[np.argmin(dist[pure], axis=1)]
    found, counts = np.unique(names[names != background], return_counts=True)
    if not len(found):
        return [nearest_colour(np.median(pixels, axis=0))]
    order = np.argsort(-counts)
    shares = counts[order] / pure.sum()
    candidates = [str(found[i]) for i, share in zip(order, shares) if share >= SECOND_COLOUR_SHARE][:3]
    candidates = candidates or [str(found[order[0]])]
    # a blend of the main colour and the background along the object's edge is not a colour
    main, bg = (np.asarray(PALETTE[c], dtype=np.float32) for c in (candidates[0], background))
    candidates = [candidates[0]] + [
        c
        for c in candidates[1:]
        if _segment_distance(np.asarray(PALETTE[c], np.float32), main, bg) >= BLEND_DISTANCE
    ]
    if len(candidates) == 3:
        rgb = [np.asarray(PALETTE[c], dtype=np.float32) for c in candidates]
        for i in (2, 1, 0):
            a, b = (rgb[j] for j in range(3) if j != i)
            if _segment_distance(rgb[i], a, b) < BLEND_DISTANCE:
                del candidates[i]
                break
    return candidates[:2]


def _analyse_object(img: np.ndarray, mask: np.ndarray, background: str) -> ObjectAnalysis:
    filled = _fill_holes(mask)
    interior = _erode(filled)
    region = interior if interior.sum() >= 8 else filled
    colours = _object_colours(img[region], background)
    s_scores, bbox = shape_scores(filled)
    shape = max(s_scores, key=s_scores.get)
    pattern, p_scores = "plain", {}
    if len(colours) == 2:
        a, b = (np.asarray(PALETTE[c], dtype=np.float32) for c in colours)
        t = (img - a) @ (b - a) / float((b - a) @ (b - a))
        second = t > 0.5
        near = np.minimum(np.linalg.norm(img - a, axis=-1), np.linalg.norm(img - b, axis=-1)) < 2 * PURE_PIXEL
        if (region & near).sum() >= 8:
            region = region & near
        p_scores = pattern_scores(second, region, shape, filled)
        pattern = max(p_scores, key=p_scores.get)
        # name the colours in the pattern's order: the first is the one under the template's
        # first-colour cells (dots' body, the outer ring, the left half, the first stripe)
        if float((_second_colour_template(pattern, shape, filled) == second)[region].mean()) < 0.5:
            colours.reverse()
    return ObjectAnalysis(
        shape=shape,
        pattern=pattern,
        colours=tuple(colours),
        bbox=bbox,
        area=float(filled.mean()),
        shape_scores=s_scores,
        pattern_scores=p_scores,
    )


def analyse(image, max_objects: int = 2) -> Analysis:
    """Background and objects (at most ``max_objects``, left to right) of one toy-world image.

    1. background = per-channel median of a 2-pixel border;
    2. objects = connected blobs of pixels at least ``MIN_CONTRAST`` from the background, holes
       filled, the largest first, blobs under ``MIN_AREA`` pixels or a tenth of the largest dropped;
    3. colours = the palette colours most interior pixels are nearest to (a second one only above
       ``SECOND_COLOUR_SHARE``);
    4. shape = the template with the highest IoU in the blob's bounding box;
    5. pattern = "plain" for one colour, else the two-colour template that agrees best.
    """
    img = to_array(image)
    bg = np.median(_border(img), axis=0)
    background = nearest_colour(bg)
    mask = np.linalg.norm(img - bg, axis=-1) > MIN_CONTRAST
    blobs = [b for b in components(mask) if b.sum() >= MIN_AREA]
    blobs = [b for b in blobs if b.sum() >= 0.1 * blobs[0].sum()][:max_objects] if blobs else []
    objects = [_analyse_object(img, b, background) for b in blobs]
    objects.sort(key=lambda o: o.bbox[1] + o.bbox[3])
    return Analysis(background, objects, tuple(map(float, bg)))


# ------------------------------------------------------------------------------------------------
# prompts


def _parse_object(words: list[str]) -> dict:
    text = " ".join(words).replace("two - tone", "two-tone")
    pattern = "plain"
    for name, phrase in sorted(PATTERNS.items(), key=lambda kv: -len(kv[1])):  # longest phrase first
        if phrase and f" {phrase} " in f" {text} ":
            pattern = name
            break
    return {
        "shape": next((w for w in words if w in SHAPES + NEW_SHAPES), None),
        "pattern": pattern,
        "colours": tuple(w for w in words if w in PALETTE) or None,
        "size": next((w for w in words if w in SIZES), None),
    }


def parse_prompt(prompt: str) -> dict:
    """What a prompt such as ``"a red and white striped circle and a blue square on a green
    background"`` asks for: ``{"objects": [{"shape", "pattern", "colours", "size"}, ...],
    "background"}``, plus the first object's ``shape``, ``colour`` and ``pattern`` for single-object
    prompts (``None`` where the prompt does not say)."""
    words = prompt.lower().replace(",", " ").replace("-", " - ").split()
    if "on" in words:
        cut = len(words) - 1 - words[::-1].index("on")
        obj_words, bg_words = words[:cut], words[cut + 1 :]
    else:
        obj_words, bg_words = words, []
    phrases, current = [], []
    for i, w in enumerate(obj_words):  # "and a"/"and an" starts a new object; "red and white" does not
        if w == "and" and i + 1 < len(obj_words) and obj_words[i + 1] in ("a", "an"):
            phrases.append(current)
            current = []
        else:
            current.append(w)
    phrases.append(current)
    objects = [_parse_object(p) for p in phrases]
    first = objects[0]
    return {
        "objects": objects,
        "background": next((w for w in bg_words if w in PALETTE), None),
        "shape": first["shape"],
        "colour": first["colours"][0] if first["colours"] else None,
        "pattern": first["pattern"],
    }


def _colours_match(want: tuple[str, ...], got: tuple[str, ...]) -> bool:
    return set(want) == set(got)


def score_image(image, prompt: str | dict) -> dict[str, bool | None]:
    """Does ``image`` follow ``prompt`` (a string or :func:`parse_prompt`'s dict)?

    Returns booleans for ``count`` (as many objects as asked), ``shape``, ``colour`` (the same set of
    colours), ``pattern`` (every object, matched left to right) and ``background``; ``None`` for
    what the prompt leaves open.
    """
    want = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    got = analyse(image)
    wanted = want["objects"]
    out: dict[str, bool | None] = {"count": len(got.objects) == len(wanted)}
    pairs = list(zip(wanted, got.objects)) if out["count"] else []
    if len(wanted) == 1 and got.objects:  # one object asked: judge the largest found
        pairs = [(wanted[0], got.main)]
    for key in ("shape", "colour", "pattern"):
        asked = [w for w in wanted if w[key if key != "colour" else "colours"] is not None]
        if not asked:
            out[key] = None
        elif not pairs:
            out[key] = False
        elif key == "colour":
            out[key] = all(w["colours"] is None or _colours_match(w["colours"], g.colours) for w, g in pairs)
        else:
            out[key] = all(w[key] is None or w[key] == getattr(g, key) for w, g in pairs)
    out["background"] = None if want["background"] is None else got.background == want["background"]
    return out


def score_images(images, prompts) -> dict[str, float]:
    """Accuracy of each attribute, and of all of them together, over paired images/prompts."""
    rows = [score_image(im, p) for im, p in zip(images, prompts, strict=True)]
    out = {}
    for key in ("count", "shape", "colour", "pattern", "background"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    out["all"] = float(np.mean([all(v for v in r.values() if v is not None) for r in rows]))
    out["n"] = len(rows)
    return out


def analyse_subject(image, subject: dict = SUBJECT) -> dict:
    """Does the image show ``subject`` (a dict with ``shape``, ``pattern``, ``colours``, as in
    :func:`plugin.toy.data.subject` or a subject's ``prompts.json``)?

    Returns ``{"found", "shape", "pattern", "colours", "shape_ok", "pattern_ok", "colours_ok",
    "order_ok", "is_subject"}`` for the largest object; ``is_subject`` needs shape, pattern and the
    set of colours right. ``order_ok`` also needs them in the subject's order (the first colour left,
    on top, outside or the dots' body): what a mirror changes in halves, vertical stripes and checks.
    """
    got = analyse(image).main
    if got is None:
        return {
            "found": False,
            "shape": None,
            "pattern": None,
            "colours": (),
            "shape_ok": False,
            "pattern_ok": False,
            "colours_ok": False,
            "order_ok": False,
            "is_subject": False,
        }
    ok = {
        "shape_ok": got.shape == subject["shape"],
        "pattern_ok": got.pattern == subject["pattern"],
        "colours_ok": _colours_match(tuple(subject["colours"]), got.colours),
    }
    return {
        "found": True,
        "shape": got.shape,
        "pattern": got.pattern,
        "colours": got.colours,
        **ok,
        "order_ok": got.colours == tuple(subject["colours"]),  # the same colours, in the same order
        "is_subject": all(ok.values()),
    }
