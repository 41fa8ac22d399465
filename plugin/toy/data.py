"""A procedural image-caption data set: one flat-coloured shape on a plain background.

Every example is a 64x64 RGB image of a single object (circle, square, triangle or diamond) in one
of eight colours, at a random size and position, on a plain background of a different colour, with
a caption such as ``"a red circle on a blue background"``. Nothing is stored on disk: an example is
a pure function of its seed, so the data set is identical on every machine.

The toy base pipeline in ``assets/toy-sd`` was pretrained on this data (see
``train_scripts/pretrain_toy_base.py``) and :mod:`plugin.toy.analyser` judges images against it.

Public API:

- :data:`PALETTE`, :data:`COLOURS`, :data:`SHAPES`, :data:`SIZES`: the vocabulary.
- :func:`render`: draw one object from explicit attributes.
- :func:`sample_attributes`, :func:`make_caption`, :func:`make_example`: random examples.
- :func:`make_prompts`: a fixed, balanced list of evaluation prompts.
- :class:`ToyShapesDataset`: a ``torch.utils.data.Dataset`` over ``make_example``.
- :func:`render_subject`, :data:`SUBJECT`: the striped ball used as a fine-tuning subject.
"""

from __future__ import annotations

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
#: Size words and the object extent (bounding-box side, pixels at 64x64) they stand for.
SIZES: dict[str, tuple[float, float]] = {"small": (16.0, 24.0), "medium": (24.0, 34.0), "large": (34.0, 44.0)}
EXTENT_RANGE: tuple[float, float] = (16.0, 44.0)

#: Every word a caption can contain (the toy tokenizer's word vocabulary is built from this).
CAPTION_WORDS: tuple[str, ...] = ("a", "an", "on", "background", *COLOURS, *SHAPES, *SIZES)

_SUPERSAMPLE = 4
_COLOUR_JITTER = 12  # +- per channel, so the model sees slightly varied shades of each colour


@dataclass(frozen=True)
class Example:
    """One data-set item. ``image`` is ``(64, 64, 3)`` uint8; the rest is the ground truth."""

    image: np.ndarray = field(repr=False)
    caption: str
    shape: str
    colour: str
    background: str
    size: str
    centre: tuple[float, float]  # (x, y) in pixels
    extent: float  # bounding-box side in pixels


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@lru_cache(maxsize=8)
def _grid(image_size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(image_size * supersample, dtype=np.float32) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def shape_mask(
    shape: str,
    centre: tuple[float, float],
    extent: float,
    image_size: int = IMAGE_SIZE,
    supersample: int = _SUPERSAMPLE,
    aspect: float = 1.0,
) -> np.ndarray:
    """Anti-aliased coverage mask in ``[0, 1]`` of ``shape`` with the given bounding box.

    The box is centred at ``centre`` (x, y pixels), ``extent`` pixels wide and ``extent * aspect``
    high. Triangles point up; diamonds are squares standing on a corner.
    """
    x, y = _grid(image_size, supersample)
    cx, cy = centre
    hw, hh = extent / 2.0, extent * aspect / 2.0
    u, v = (x - cx) / hw, (y - cy) / hh  # box is [-1, 1]^2, v grows downwards
    if shape == "circle":
        inside = u**2 + v**2 <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif shape == "triangle":
        inside = (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    elif shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= 1.0
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    m = inside.astype(np.float32)
    return m.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator | None) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float32)
    if rng is not None:
        c = c + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3)
    return np.clip(c, 0, 255)


def render(
    shape: str,
    colour: str,
    background: str,
    centre: tuple[float, float] = (32.0, 32.0),
    extent: float = 30.0,
    image_size: int = IMAGE_SIZE,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw one ``shape`` of ``colour`` on a plain ``background``; returns ``(H, W, 3)`` uint8.

    With ``rng`` the two colours get a small random shade jitter (as in the data set); without it
    the exact palette colours are used.
    """
    fg, bg = _jitter(PALETTE[colour], rng), _jitter(PALETTE[background], rng)
    m = shape_mask(shape, centre, extent, image_size)[..., None]
    img = m * fg + (1.0 - m) * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _size_word(extent: float) -> str:
    for word, (lo, hi) in SIZES.items():
        if lo <= extent < hi:
            return word
    return "large" if extent >= EXTENT_RANGE[1] else "small"


def sample_attributes(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> dict:
    """Draw random ``shape, colour, background, extent, centre, size`` (object fully inside)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    others = [c for c in COLOURS if c != colour]
    background = others[rng.integers(len(others))]
    scale = image_size / IMAGE_SIZE
    extent = float(rng.uniform(*EXTENT_RANGE)) * scale
    margin = extent / 2 + 2 * scale
    centre = (
        float(rng.uniform(margin, image_size - margin)),
        float(rng.uniform(margin, image_size - margin)),
    )
    return {
        "shape": shape,
        "colour": colour,
        "background": background,
        "extent": extent,
        "centre": centre,
        "size": _size_word(extent / scale),
    }


def make_caption(
    shape: str,
    colour: str | None = None,
    background: str | None = None,
    size: str | None = None,
) -> str:
    """``"a [size] [colour] shape [on a background background]"``; ``None`` parts are left out."""
    words = [w for w in (size, colour, shape) if w]
    caption = f"{_article(words[0])} {' '.join(words)}"
    if background:
        caption += f" on {_article(background)} {background} background"
    return caption


def random_caption(
    shape: str,
    colour: str,
    background: str,
    size: str,
    rng: np.random.Generator,
    p_size_word: float = 0.25,
    p_drop_colour: float = 0.1,
    p_drop_background: float = 0.15,
) -> str:
    """A caption for the given attributes with the size word randomly added and colour/background
    randomly left out (see :func:`make_example`)."""
    u = rng.random(3)
    return make_caption(
        shape,
        None if u[1] < p_drop_colour else colour,
        None if u[2] < p_drop_background else background,
        size if u[0] < p_size_word else None,
    )


def make_example(
    seed_or_rng: int | np.random.Generator,
    image_size: int = IMAGE_SIZE,
    p_size_word: float = 0.25,
    p_drop_colour: float = 0.1,
    p_drop_background: float = 0.15,
) -> Example:
    """One deterministic example: the same seed always gives the same image and caption.

    The caption always names the shape; the size word is added with probability ``p_size_word``
    and the colour / background are left out with the given probabilities, so that partial prompts
    ("a circle", "a red square") are in distribution too. Use all-zero/one probabilities
    (``p_size_word=0, p_drop_colour=0, p_drop_background=0``) for the full canonical caption.
    """
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    a = sample_attributes(rng, image_size)
    image = render(a["shape"], a["colour"], a["background"], a["centre"], a["extent"], image_size, rng)
    caption = random_caption(
        a["shape"],
        a["colour"],
        a["background"],
        a["size"],
        rng,
        p_size_word,
        p_drop_colour,
        p_drop_background,
    )
    return Example(
        image, caption, a["shape"], a["colour"], a["background"], a["size"], a["centre"], a["extent"]
    )


def make_scene(
    seed_or_rng: int | np.random.Generator, max_objects: int = 4, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """An uncaptioned image of 1..``max_objects`` possibly overlapping objects of random colours and
    sizes (down to 6 px), on a plain background. Used only to fine-tune the autoencoder's decoder,
    so that it renders small, multi-coloured detail; the text-to-image model never sees these.
    """
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    img = np.broadcast_to(
        _jitter(PALETTE[COLOURS[rng.integers(len(COLOURS))]], rng), (image_size, image_size, 3)
    )
    for _ in range(int(rng.integers(1, max_objects + 1))):
        extent = float(rng.uniform(6.0, 44.0)) * image_size / IMAGE_SIZE
        centre = (float(rng.uniform(0, image_size)), float(rng.uniform(0, image_size)))
        m = shape_mask(SHAPES[rng.integers(len(SHAPES))], centre, extent, image_size)[..., None]
        img = m * _jitter(PALETTE[COLOURS[rng.integers(len(COLOURS))]], rng) + (1.0 - m) * img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_prompts(n: int = 64, seed: int = 0) -> list[dict]:
    """``n`` evaluation prompts, balanced over shapes and colours, with a background each.

    Returns dicts ``{"prompt", "shape", "colour", "background", "seed"}``; ``seed`` is a per-prompt
    generation seed. Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    order = rng.permutation(len(combos))
    out = []
    for i in range(n):
        shape, colour = combos[order[i % len(combos)]]
        others = [c for c in COLOURS if c != colour]
        background = others[rng.integers(len(others))]
        out.append(
            {
                "prompt": make_caption(shape, colour, background),
                "shape": shape,
                "colour": colour,
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
    ground-truth attributes. Extra keyword arguments go to :func:`make_example`.
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
            "colour": ex.colour,
            "background": ex.background,
        }


# --------------------------------------------------------------------------------------------
# The fine-tuning subject: something the base model has never seen.

#: A circle with horizontal yellow and black stripes (a "bee ball"). The pretraining data has only
#: flat single-colour objects, so the pattern is new to the base model.
SUBJECT: dict = {
    "name": "striped ball",
    "shape": "circle",
    "stripe_colours": ("yellow", "black"),
    "token": "sks",
    "instance_prompt": "a sks circle",
    "class_prompt": "a circle",
}
SUBJECT_BACKGROUNDS: tuple[str, ...] = ("white", "blue", "green", "red", "purple")


def render_subject(
    centre: tuple[float, float] = (32.0, 32.0),
    extent: float = 34.0,
    background: str = "blue",
    image_size: int = IMAGE_SIZE,
    stripes: int = 5,
) -> np.ndarray:
    """Draw the subject (a circle with ``stripes`` yellow/black horizontal bands) on ``background``."""
    ss = _SUPERSAMPLE
    n = image_size * ss
    y = (np.arange(n, dtype=np.float64) + 0.5) / ss
    band = np.floor((y - (centre[1] - extent / 2)) / (extent / stripes)).astype(int) % 2  # 0 yellow, 1 black
    a, b = (np.asarray(PALETTE[c], dtype=np.float32) for c in SUBJECT["stripe_colours"])
    # colour per supersampled row, averaged down to pixel rows (anti-aliased band edges)
    row_col = np.where(band[:, None] == 0, a, b).reshape(image_size, ss, 3).mean(axis=1)
    m = shape_mask("circle", centre, extent, image_size)[..., None]
    bg = np.asarray(PALETTE[background], dtype=np.float32)
    img = m * row_col[:, None, :] + (1.0 - m) * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_subject_images(n: int = 5, seed: int = 1234) -> list[tuple[np.ndarray, dict]]:
    """``n`` deterministic subject images varied in position, size and background.

    Returns ``(image, info)`` pairs; ``info`` has ``centre, extent, background``.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        extent = float(rng.uniform(26.0, 44.0))
        margin = extent / 2 + 2
        centre = (float(rng.uniform(margin, 64 - margin)), float(rng.uniform(margin, 64 - margin)))
        background = SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)]
        info = {"centre": centre, "extent": extent, "background": background}
        out.append((render_subject(centre, extent, background, IMAGE_SIZE), info))
    return out


def write_subject(out_dir, n: int = 5, seed: int = 1234) -> dict:
    """Write the subject's images (``0.png`` ...) and ``prompts.json`` to ``out_dir``.

    ``prompts.json`` holds the DreamBooth ``instance_prompt`` / ``class_prompt``, a caption per
    image and validation prompts. Returns its contents.
    """
    import json
    from pathlib import Path

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token, shape = SUBJECT["token"], SUBJECT["shape"]
    captions = {}
    for i, (image, info) in enumerate(make_subject_images(n, seed)):
        Image.fromarray(image).save(out / f"{i}.png")
        captions[f"{i}.png"] = make_caption(shape, token, info["background"])
    prompts = {
        "subject": f"{SUBJECT['name']}: a {shape} with horizontal {' and '.join(SUBJECT['stripe_colours'])} stripes",
        "instance_prompt": SUBJECT["instance_prompt"],
        "class_prompt": SUBJECT["class_prompt"],
        "captions": captions,
        "validation_prompts": [
            make_caption(shape, token, bg) for bg in ("white", "green", "orange", "purple")
        ],
        "analyser": "plugin.toy.analyser.analyse_subject(image)['is_subject']",
    }
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    return prompts
