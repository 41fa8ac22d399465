"""A procedural image-caption world: patterned, two-colour shapes on plain backgrounds.

Every example is a 64x64 RGB image of one or two objects on a plain background, with a caption
that names all of it: ``"a red and white striped circle on a blue background"``, ``"a small
yellow square and a black and green checked diamond on a white background"``. An object has a
shape (circle, square, triangle, diamond), a pattern (plain, or one of seven two-colour patterns:
stripes in three directions, checks, dots, rings, two-tone halves), one or two colours out of
eight, a size and a position. Nothing is stored on disk: an example is a pure function of its
seed, identical on every machine.

Some combinations of pattern x colours x shape are held out of pretraining entirely
(:data:`HELDOUT`): the base model knows every part of them but never saw the whole, which makes
them fair DreamBooth subjects (the way a real base model knows "dog", "spotted" and "brown").

The toy base pipeline in ``assets/toy-sd`` was pretrained on this world
(``train_scripts/pretrain_toy_base.py``); :mod:`plugin.toy.analyser` reads images back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 64

#: Named colours (RGB, 0-255). Pairwise distances are at least ~90 so that a blurry generated pixel
#: still maps to the right name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "purple": (150, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
#: Shapes pretraining never draws (nor names: the tokenizer spells them letter by letter), for
#: DreamBooth subjects well outside what the base knows. The analyser recognises them too.
NEW_SHAPES: tuple[str, ...] = ("cross",)
#: Pattern name -> the words a caption uses for it (before the shape). "plain" has one colour.
PATTERNS: dict[str, str] = {
    "plain": "",
    "hstripes": "striped",
    "vstripes": "vertical striped",
    "dstripes": "diagonal striped",
    "checks": "checked",
    "dots": "dotted",
    "rings": "ringed",
    "halves": "two-tone",
}
#: Size words and the object extent (bounding-box side, pixels at 64x64) they stand for.
SIZES: dict[str, tuple[float, float]] = {"small": (16.0, 24.0), "medium": (24.0, 34.0), "large": (34.0, 46.0)}
EXTENT_RANGE: tuple[float, float] = (16.0, 46.0)
PATTERNED_MIN_EXTENT = 22.0  # a pattern has four cells across; below ~22 px they blur together

#: (pattern, colour, colour, shape) combinations never shown in pretraining, in either colour order.
#: Each of their parts is common in the data; the first is the shipped DreamBooth subject.
HELDOUT: tuple[tuple[str, str, str, str], ...] = (
    ("hstripes", "yellow", "black", "circle"),
    ("checks", "red", "white", "square"),
    ("dots", "blue", "yellow", "triangle"),
    ("rings", "green", "purple", "circle"),
    ("halves", "orange", "blue", "diamond"),
    ("vstripes", "purple", "white", "square"),
    ("dstripes", "black", "orange", "diamond"),
    ("checks", "green", "yellow", "circle"),
)

#: Every word a caption can contain (the toy tokenizer's vocabulary is built from this).
CAPTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "an", "and", "on", "background", *COLOURS, *SHAPES, *SIZES]
        + [w for words in PATTERNS.values() for w in words.replace("-", " - ").split()]
    )
)

_SUPERSAMPLE = 4
_COLOUR_JITTER = 12  # +- per channel, so the model sees slightly varied shades of each colour


@dataclass(frozen=True)
class Object:
    """One drawn object. ``colours`` has one entry for "plain", two otherwise (the first is the
    body of dots, the outer ring, the left half, the first stripe or check)."""

    shape: str
    pattern: str
    colours: tuple[str, ...]
    centre: tuple[float, float]  # (x, y) in pixels
    extent: float  # bounding-box side in pixels

    @property
    def size(self) -> str:
        return size_word(self.extent)


@dataclass(frozen=True)
class Example:
    """One data-set item. ``image`` is ``(64, 64, 3)`` uint8; the rest is the ground truth."""

    image: np.ndarray = field(repr=False)
    caption: str
    objects: tuple[Object, ...]
    background: str

    # The single-object view the older API and simple prompts use: the first object.
    @property
    def shape(self) -> str:
        return self.objects[0].shape

    @property
    def colour(self) -> str:
        return self.objects[0].colours[0]

    @property
    def pattern(self) -> str:
        return self.objects[0].pattern


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def size_word(extent: float) -> str:
    for word, (lo, hi) in SIZES.items():
        if lo <= extent < hi:
            return word
    return "large" if extent >= EXTENT_RANGE[1] else "small"


def is_heldout(pattern: str, colours: tuple[str, ...], shape: str) -> bool:
    """Is this combination one of :data:`HELDOUT` (either colour order)?"""
    if len(colours) != 2:
        return False
    return any(p == pattern and s == shape and {a, b} == set(colours) for p, a, b, s in HELDOUT)


# ------------------------------------------------------------------------------------------------
# drawing


@lru_cache(maxsize=8)
def _grid(image_size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(image_size * supersample, dtype=np.float32) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # points up
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "diamond":  # a square standing on a corner
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":  # a plus sign, arms a third of the box wide
        return ((np.abs(u) <= 1 / 3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 1 / 3) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + NEW_SHAPES}")


def pattern_field(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean map: True where the pattern shows its second colour. ``u, v`` are the object's box
    coordinates in ``[-1, 1]`` (v grows downwards); every pattern has about four cells across."""
    if pattern == "plain":
        return np.zeros(np.broadcast(u, v).shape, dtype=bool)
    if pattern == "hstripes":
        return np.floor((v + 1.0) * 2.0).astype(int) % 2 == 1
    if pattern == "vstripes":
        return np.floor((u + 1.0) * 2.0).astype(int) % 2 == 1
    if pattern == "dstripes":
        return np.floor((u + v + 2.0) * 1.4).astype(int) % 2 == 1
    if pattern == "checks":
        return (np.floor((u + 1.0) * 2.0).astype(int) + np.floor((v + 1.0) * 2.0).astype(int)) % 2 == 1
    if pattern == "dots":  # a 3x3 grid of dots on the body colour
        du = u - np.clip(np.round(u / 0.6), -1, 1) * 0.6
        dv = v - np.clip(np.round(v / 0.6), -1, 1) * 0.6
        return du**2 + dv**2 <= 0.2**2
    if pattern == "rings":  # outer ring first colour, then alternating inwards
        return np.floor((1.0 - np.sqrt(u**2 + v**2)) * 3.0).astype(int) % 2 == 1
    if pattern == "halves":  # left half first colour
        return u >= 0.0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {tuple(PATTERNS)}")


def object_maps(
    obj: Object, image_size: int = IMAGE_SIZE, supersample: int = _SUPERSAMPLE, aspect: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled boolean ``(inside, second_colour)`` maps of one object.

    The box is centred at ``obj.centre``, ``obj.extent`` wide and ``extent * aspect`` high.
    """
    x, y = _grid(image_size, supersample)
    cx, cy = obj.centre
    hw, hh = obj.extent / 2.0, obj.extent * aspect / 2.0
    u, v = (x - cx) / hw, (y - cy) / hh
    return _inside(obj.shape, u, v), pattern_field(obj.pattern, u, v)


def _downsample(a: np.ndarray, image_size: int, supersample: int) -> np.ndarray:
    return a.reshape(image_size, supersample, image_size, supersample, *a.shape[2:]).mean(axis=(1, 3))


def shape_mask(
    shape: str,
    centre: tuple[float, float],
    extent: float,
    image_size: int = IMAGE_SIZE,
    supersample: int = _SUPERSAMPLE,
    aspect: float = 1.0,
) -> np.ndarray:
    """Anti-aliased coverage mask in ``[0, 1]`` of ``shape`` in a box centred at ``centre`` (x, y),
    ``extent`` wide and ``extent * aspect`` high."""
    inside, _ = object_maps(
        Object(shape, "plain", ("white",), centre, extent), image_size, supersample, aspect
    )
    return _downsample(inside.astype(np.float32), image_size, supersample)


def pattern_template(
    pattern: str, shape: str, centre: tuple[float, float], extent: float, image_size: int, aspect: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, second-colour share)`` at pixel resolution, for the analyser's templates."""
    inside, second = object_maps(
        Object(shape, pattern, ("white", "black"), centre, extent), image_size, 2, aspect
    )
    return _downsample(inside.astype(np.float32), image_size, 2), _downsample(
        (inside & second).astype(np.float32), image_size, 2
    )


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator | None) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float32)
    if rng is not None:
        c = c + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3)
    return np.clip(c, 0, 255)


def render_scene(
    objects: list[Object] | tuple[Object, ...],
    background: str,
    image_size: int = IMAGE_SIZE,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw ``objects`` (later ones on top) on a plain ``background``; ``(H, W, 3)`` uint8.

    With ``rng`` every colour gets a small random shade jitter (as in the data set).
    """
    ss = _SUPERSAMPLE
    img = np.empty((image_size * ss, image_size * ss, 3), dtype=np.float32)
    img[:] = _jitter(PALETTE[background], rng)
    for obj in objects:
        inside, second = object_maps(obj, image_size, ss)
        first = _jitter(PALETTE[obj.colours[0]], rng)
        other = _jitter(PALETTE[obj.colours[-1]], rng)
        img[inside & ~second] = first
        img[inside & second] = other
    return np.clip(np.rint(_downsample(img, image_size, ss)), 0, 255).astype(np.uint8)


def render(
    shape: str,
    colour: str,
    background: str,
    centre: tuple[float, float] = (32.0, 32.0),
    extent: float = 30.0,
    image_size: int = IMAGE_SIZE,
    rng: np.random.Generator | None = None,
    pattern: str = "plain",
    second_colour: str | None = None,
) -> np.ndarray:
    """Draw one object (plain ``colour``, or ``pattern`` of ``colour`` and ``second_colour``)."""
    colours = (colour,) if pattern == "plain" else (colour, second_colour)
    if None in colours:
        raise ValueError(f"pattern {pattern!r} needs a second_colour")
    return render_scene([Object(shape, pattern, colours, centre, extent)], background, image_size, rng)


# ------------------------------------------------------------------------------------------------
# captions


def _phrase(*words: str | None) -> str:
    """``"a"``/``"an"`` and the non-empty ``words``: ``_phrase(None, "orange", "", "square")``."""
    kept = [w for w in words if w]
    return f"{_article(kept[0])} {' '.join(kept)}"


def _on_background(background: str | None) -> str:
    return f" on {_article(background)} {background} background" if background else ""


def object_phrase(obj: Object, colours: bool = True, size: bool = False) -> str:
    """``"a [size] [red and white] [striped] circle"``."""
    return _phrase(
        obj.size if size else None,
        " and ".join(obj.colours) if colours else None,
        PATTERNS[obj.pattern],
        obj.shape,
    )


def make_caption(
    shape: str,
    colour: str | None = None,
    background: str | None = None,
    size: str | None = None,
    pattern: str = "plain",
    second_colour: str | None = None,
) -> str:
    """``"a [size] [colour [and colour]] [pattern] shape [on a background background]"``; ``None``
    parts are left out."""
    colour_words = " and ".join(c for c in (colour, second_colour) if c)
    return _phrase(size, colour_words, PATTERNS[pattern], shape) + _on_background(background)


def scene_caption(objects, background: str | None, colours: bool = True, sizes: bool = False) -> str:
    """Objects named left to right, joined by "and", then the background."""
    ordered = sorted(objects, key=lambda o: o.centre[0])
    return " and ".join(object_phrase(o, colours, sizes) for o in ordered) + _on_background(background)


def random_caption(
    objects,
    background: str,
    rng: np.random.Generator,
    p_size_word: float = 0.2,
    p_drop_colour: float = 0.1,
    p_drop_background: float = 0.15,
) -> str:
    """A caption for the scene with size words randomly added (single objects only) and the colours /
    background randomly left out, so that partial prompts ("a circle", "a checked square") are in
    distribution too."""
    u = rng.random(3)
    return scene_caption(
        objects,
        None if u[2] < p_drop_background else background,
        colours=u[1] >= p_drop_colour,
        sizes=len(objects) == 1 and u[0] < p_size_word,
    )


# ------------------------------------------------------------------------------------------------
# random scenes


def sample_object(
    rng: np.random.Generator,
    exclude: set[str],
    extent_range: tuple[float, float] = EXTENT_RANGE,
    p_plain: float = 0.3,
    allow_heldout: bool = False,
) -> tuple[str, str, tuple[str, ...], float]:
    """Random ``(shape, pattern, colours, extent)``: colours differ from each other and from
    ``exclude`` (the background); held-out combinations are redrawn unless ``allow_heldout``."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        extent = float(rng.uniform(*extent_range))
        plain = rng.random() < p_plain or extent < PATTERNED_MIN_EXTENT
        pattern = "plain" if plain else tuple(PATTERNS)[1 + rng.integers(len(PATTERNS) - 1)]
        allowed = [c for c in COLOURS if c not in exclude]
        picks = rng.permutation(len(allowed))[: 1 if plain else 2]
        colours = tuple(allowed[i] for i in picks)
        if allow_heldout or not is_heldout(pattern, colours, shape):
            return shape, pattern, colours, extent


def sample_scene(
    rng: np.random.Generator, p_two_objects: float = 0.25, allow_heldout: bool = False
) -> tuple[list[Object], str]:
    """Random objects (one, or two side by side) and a background colour none of them uses."""
    background = COLOURS[rng.integers(len(COLOURS))]
    if rng.random() >= p_two_objects:
        shape, pattern, colours, extent = sample_object(rng, {background}, allow_heldout=allow_heldout)
        margin = extent / 2 + 2
        centre = (
            float(rng.uniform(margin, IMAGE_SIZE - margin)),
            float(rng.uniform(margin, IMAGE_SIZE - margin)),
        )
        return [Object(shape, pattern, colours, centre, extent)], background
    objects = []
    for half in (0, 1):  # one object in each half, so they never overlap
        shape, pattern, colours, extent = sample_object(rng, {background}, (16.0, 30.0), 0.5, allow_heldout)
        margin = extent / 2 + 1
        lo, hi = half * 32 + margin, half * 32 + 32 - margin
        centre = (float(rng.uniform(lo, hi)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
        objects.append(Object(shape, pattern, colours, centre, extent))
    return objects, background


def make_example(
    seed_or_rng: int | np.random.Generator,
    p_size_word: float = 0.2,
    p_drop_colour: float = 0.1,
    p_drop_background: float = 0.15,
    p_two_objects: float = 0.25,
) -> Example:
    """One deterministic example: the same seed always gives the same image and caption.

    Use ``p_size_word=0, p_drop_colour=0, p_drop_background=0`` for the full canonical caption.
    """
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    objects, background = sample_scene(rng, p_two_objects)
    image = render_scene(objects, background, IMAGE_SIZE, rng)
    caption = random_caption(objects, background, rng, p_size_word, p_drop_colour, p_drop_background)
    return Example(image, caption, tuple(objects), background)


def make_prompts(n: int = 64, seed: int = 0, shapes: Sequence[str] = SHAPES) -> list[dict]:
    """``n`` single-object evaluation prompts, balanced over ``shapes`` and patterns, with colours and
    a background each; none is a held-out combination.

    Returns dicts ``{"prompt", "shape", "pattern", "colours", "background", "seed"}``; ``seed`` is a
    per-prompt generation seed. Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    combos = [(s, p) for s in shapes for p in PATTERNS]
    order = rng.permutation(len(combos))
    out = []
    for i in range(n):
        shape, pattern = combos[order[i % len(combos)]]
        while True:
            picks = rng.permutation(len(COLOURS))
            colours = tuple(COLOURS[j] for j in picks[: 1 if pattern == "plain" else 2])
            background = COLOURS[picks[2]]
            if not is_heldout(pattern, colours, shape):
                break
        obj = Object(shape, pattern, colours, (32.0, 32.0), 32.0)
        out.append(
            {
                "prompt": scene_caption([obj], background),
                "shape": shape,
                "pattern": pattern,
                "colours": colours,
                "background": background,
                "seed": int(seed * 100_000 + i),
            }
        )
    return out


def to_tensor(image: np.ndarray):
    """uint8 ``(H, W, 3)`` -> float32 ``(3, H, W)`` tensor in ``[-1, 1]`` (the VAE's input range)."""
    import torch

    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ToyShapesDataset:
    """``torch.utils.data.Dataset`` of ``length`` examples; item ``i`` is ``make_example(seed + i)``.

    Items are dicts ``{"pixel_values": (3, 64, 64) float32 in [-1, 1], "caption": str}`` plus the
    first object's shape, pattern and colour and the background. Extra keyword arguments go to
    :func:`make_example`.
    """

    def __init__(self, length: int = 10_000, seed: int = 0, **example_kwargs):
        self.length, self.seed, self.example_kwargs = length, seed, example_kwargs

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        ex = make_example(self.seed * 1_000_003 + i, **self.example_kwargs)
        return {
            "pixel_values": to_tensor(ex.image),
            "caption": ex.caption,
            "shape": ex.shape,
            "pattern": ex.pattern,
            "colour": ex.colour,
            "background": ex.background,
            "num_objects": len(ex.objects),
        }


# --------------------------------------------------------------------------------------------
# DreamBooth subjects: held-out combinations the base model has never seen whole.


def make_subject(pattern: str, colours: tuple[str, ...], shape: str, token: str = "sks") -> dict:
    """A DreamBooth subject: its attributes (what the analyser checks) and its prompts."""
    name = " and ".join(colours) + (f" {PATTERNS[pattern]}" if PATTERNS[pattern] else "") + f" {shape}"
    return {
        "name": name,
        "shape": shape,
        "pattern": pattern,
        "colours": tuple(colours),
        "token": token,
        "instance_prompt": f"a {token} {shape}",
        "class_prompt": f"a {shape}",
    }


def subject(index: int = 0, token: str = "sks") -> dict:
    """The DreamBooth subject made from ``HELDOUT[index]``."""
    pattern, a, b, shape = HELDOUT[index]
    return make_subject(pattern, (a, b), shape, token)


#: The shipped subject: a circle with horizontal yellow and black stripes (a "bee ball").
SUBJECT: dict = subject(0)
SUBJECT_BACKGROUNDS: tuple[str, ...] = ("white", "blue", "green", "red", "purple")


def render_subject(
    centre: tuple[float, float] = (32.0, 32.0),
    extent: float = 34.0,
    background: str = "blue",
    image_size: int = IMAGE_SIZE,
    subject_: dict = SUBJECT,
) -> np.ndarray:
    """Draw a subject (the shipped one by default) on ``background``."""
    obj = Object(subject_["shape"], subject_["pattern"], subject_["colours"], centre, extent)
    return render_scene([obj], background, image_size)


def make_subject_images(
    n: int = 5, seed: int = 1234, subject_: dict = SUBJECT, backgrounds: tuple[str, ...] | None = None
) -> list[tuple[np.ndarray, dict]]:
    """``n`` deterministic images of a subject, varied in position, size and background (cycling
    through ``backgrounds``, default: colours the subject doesn't use). ``(image, info)`` pairs."""
    if backgrounds is None:
        backgrounds = tuple(c for c in SUBJECT_BACKGROUNDS + COLOURS if c not in subject_["colours"])
        backgrounds = tuple(dict.fromkeys(backgrounds))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        extent = float(rng.uniform(28.0, 44.0))
        margin = extent / 2 + 2
        centre = (float(rng.uniform(margin, 64 - margin)), float(rng.uniform(margin, 64 - margin)))
        background = backgrounds[i % len(backgrounds)]
        info = {"centre": centre, "extent": extent, "background": background}
        out.append((render_subject(centre, extent, background, IMAGE_SIZE, subject_), info))
    return out


def write_subject(out_dir, n: int = 5, seed: int = 1234, subject_: dict = SUBJECT) -> dict:
    """Write a subject's images (``0.png`` ...) and ``prompts.json`` to ``out_dir``.

    ``prompts.json`` holds the DreamBooth ``instance_prompt`` / ``class_prompt``, a caption per
    image and validation prompts (on backgrounds the images do not show, too). Returns its contents.
    """
    import json
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token, shape = subject_["token"], subject_["shape"]
    captions = {}
    images = make_subject_images(n, seed, subject_)
    for i, (image, info) in enumerate(images):
        Image.fromarray(image).save(out / f"{i}.png")
        captions[f"{i}.png"] = make_caption(shape, token, info["background"])
    seen = list(dict.fromkeys(info["background"] for _, info in images))
    unseen = [c for c in COLOURS if c not in seen and c not in subject_["colours"]]
    validation = [make_caption(shape, token, bg) for bg in [*seen[:2], *unseen[:2]]]
    prompts = {
        "subject": subject_["name"],
        "pattern": subject_["pattern"],
        "colours": list(subject_["colours"]),
        "shape": shape,
        "instance_prompt": subject_["instance_prompt"],
        "class_prompt": subject_["class_prompt"],
        "captions": captions,
        "validation_prompts": [subject_["instance_prompt"], *validation][-4:],
        "analyser": "plugin.toy.analyser.analyse_subject(image, prompts)['is_subject']",
    }
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    return prompts


def make_pair_prompts(n: int = 16, seed: int = 0) -> list[dict]:
    """``n`` two-object evaluation prompts ("a red circle and a blue and white checked square on a
    green background"), deterministic for ``seed``; same dict layout as :func:`make_prompts` with
    ``"objects"`` (shape, pattern, colours per object, left to right) instead of the single fields."""
    rng = np.random.default_rng(10_000 + seed)
    out = []
    for i in range(n):
        objects, background = sample_scene(rng, p_two_objects=1.0)
        out.append(
            {
                "prompt": scene_caption(objects, background),
                "objects": [
                    {"shape": o.shape, "pattern": o.pattern, "colours": o.colours}
                    for o in sorted(objects, key=lambda o: o.centre[0])
                ],
                "background": background,
                "seed": int(seed * 100_000 + 50_000 + i),
            }
        )
    return out
