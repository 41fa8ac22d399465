"""The toy base: procedural data, its analyser, the subject, and the shipped pipeline in assets/toy-sd."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from plugin.toy.analyser import analyse, analyse_subject, parse_prompt, score_image, score_images
from plugin.toy.data import (
    CAPTION_WORDS,
    COLOURS,
    HELDOUT,
    PATTERNS,
    SHAPES,
    ToyShapesDataset,
    is_heldout,
    make_caption,
    make_example,
    make_pair_prompts,
    make_prompts,
    make_subject_images,
    render,
    subject,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "toy-sd"
SUBJECT = ROOT / "assets" / "subject"
# Floors for the shipped base on 16 fixed prompts, well under what evaluate_toy_base.py measures on 80.
SHAPE_FLOOR, COLOUR_FLOOR, PATTERN_FLOOR = 0.75, 0.5, 0.5


# ------------------------------------------------------------------------------------------------
# data


def test_examples_are_deterministic_for_a_seed():
    a, b, c = make_example(7), make_example(7), make_example(8)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    d1, d2 = ToyShapesDataset(16, seed=3), ToyShapesDataset(16, seed=3)
    assert all(torch.equal(d1[i]["pixel_values"], d2[i]["pixel_values"]) for i in range(16))
    assert [d1[i]["caption"] for i in range(16)] == [d2[i]["caption"] for i in range(16)]


def test_world_covers_patterns_colours_and_scenes_and_never_shows_heldout_combinations():
    seen = {"shape": set(), "pattern": set(), "colour": set(), "objects": set()}
    for i in range(2000):
        ex = make_example(i, p_size_word=0, p_drop_colour=0, p_drop_background=0)
        assert set(ex.caption.replace("-", " - ").split()) <= set(CAPTION_WORDS), ex.caption
        assert parse_prompt(ex.caption)["background"] == ex.background
        seen["objects"].add(len(ex.objects))
        for obj in ex.objects:
            assert not is_heldout(obj.pattern, obj.colours, obj.shape), obj
            assert ex.background not in obj.colours and len(set(obj.colours)) == len(obj.colours)
            seen["shape"].add(obj.shape)
            seen["pattern"].add(obj.pattern)
            seen["colour"].update(obj.colours)
    assert seen == {"shape": set(SHAPES), "pattern": set(PATTERNS), "colour": set(COLOURS), "objects": {1, 2}}
    # every part of every held-out combination is common on its own
    assert all(p in PATTERNS and a in COLOURS and b in COLOURS and s in SHAPES for p, a, b, s in HELDOUT)


def test_captions_name_everything():
    assert make_caption("circle", "red", "blue") == "a red circle on a blue background"
    assert make_caption("square", "orange", "orange") == "an orange square on an orange background"
    assert make_caption("triangle") == "a triangle"
    assert (
        make_caption("square", "red", "green", pattern="checks", second_colour="white")
        == "a red and white checked square on a green background"
    )
    two = make_pair_prompts(4, seed=0)[0]
    parsed = parse_prompt(two["prompt"])
    assert [(o["shape"], o["pattern"], o["colours"]) for o in parsed["objects"]] == [
        (o["shape"], o["pattern"], tuple(o["colours"])) for o in two["objects"]
    ]


def test_eval_prompts_are_balanced_fixed_and_not_heldout():
    prompts = make_prompts(64, seed=0)
    assert prompts == make_prompts(64, seed=0) and len(prompts) == 64
    assert {p["shape"] for p in prompts} == set(SHAPES) and {p["pattern"] for p in prompts} == set(PATTERNS)
    for p in prompts:
        parsed = parse_prompt(p["prompt"])
        assert (parsed["shape"], parsed["pattern"], parsed["background"]) == (
            p["shape"],
            p["pattern"],
            p["background"],
        )
        assert parsed["objects"][0]["colours"] == p["colours"]
        assert not is_heldout(p["pattern"], p["colours"], p["shape"])


# ------------------------------------------------------------------------------------------------
# analyser


def _box_blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    out = img.astype(np.float32)
    for _ in range(passes):
        p = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        out = sum(p[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9.0
    return out


def test_analyser_reads_the_generators_images():
    examples = [
        make_example(50_000 + i, p_size_word=0, p_drop_colour=0, p_drop_background=0) for i in range(200)
    ]
    acc = score_images([ex.image for ex in examples], [ex.caption for ex in examples])
    assert all(acc[k] >= 0.98 for k in ("count", "shape", "colour", "pattern", "background")), acc


def test_analyser_is_robust_to_blur_and_noise():
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(100):
        ex = make_example(60_000 + i, p_size_word=0, p_drop_colour=0, p_drop_background=0)
        images.append(np.clip(_box_blur(ex.image) + rng.normal(0, 6, ex.image.shape), 0, 255))
        prompts.append(ex.caption)
    acc = score_images(images, prompts)
    assert all(acc[k] >= 0.9 for k in ("count", "shape", "colour", "pattern", "background")), acc


def test_analyser_reads_every_pattern_and_its_colour_order():
    for pattern in PATTERNS:
        for shape in SHAPES:
            second = None if pattern == "plain" else "white"
            img = render(shape, "blue", "yellow", (31, 33), 34, pattern=pattern, second_colour=second)
            obj = analyse(img).main
            assert (obj.shape, obj.pattern) == (shape, pattern), (shape, pattern, obj)
            assert obj.colours == (("blue",) if second is None else ("blue", "white")), (shape, pattern, obj)


def test_analyser_edge_cases():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert not analyse(flat).found
    img = render("triangle", "green", "white", (30, 34), 36)
    assert score_image(img, "a green triangle on a white background") == {
        "count": True,
        "shape": True,
        "colour": True,
        "pattern": True,
        "background": True,
    }
    wrong = score_image(img, "a red and black striped square")
    assert wrong == {"count": True, "shape": False, "colour": False, "pattern": False, "background": None}
    assert score_image(img, "a green triangle and a red circle")["count"] is False


def test_subjects_are_recognised_and_never_in_the_data():
    for index in range(len(HELDOUT)):
        subj = subject(index)
        for image, _ in make_subject_images(4, subject_=subj):
            assert analyse_subject(image, subj)["is_subject"], subj["name"]
        assert not any(analyse_subject(make_example(i).image, subj)["is_subject"] for i in range(100))


def test_subject_colour_order_is_read_and_a_mirror_changes_it_only_where_it_should():
    # the first colour is left in halves and vertical stripes and on the top-left cell of checks: a
    # mirror swaps those; horizontal stripes, dots and rings look the same mirrored
    swapped_by_mirror = {"halves", "vstripes", "checks"}
    for index in range(len(HELDOUT)):
        subj = subject(index)
        if subj["pattern"] == "dstripes":  # mirrored, its stripes run the other way: another pattern
            continue
        for image, _ in make_subject_images(2, subject_=subj):
            assert analyse_subject(image, subj)["order_ok"], subj["name"]
            mirrored = analyse_subject(np.ascontiguousarray(image[:, ::-1]), subj)
            assert mirrored["is_subject"], subj["name"]
            assert mirrored["order_ok"] == (subj["pattern"] not in swapped_by_mirror), subj["name"]


def test_shipped_subject_matches_its_generator():
    from PIL import Image

    prompts = json.loads((SUBJECT / "prompts.json").read_text())
    assert {"instance_prompt", "class_prompt", "pattern", "colours", "shape"} <= set(prompts)
    files = sorted(SUBJECT.glob("*.png"))
    assert 4 <= len(files) <= 6
    for f, (image, _) in zip(files, make_subject_images(len(files))):
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), image)
        assert analyse_subject(image, prompts)["is_subject"]


# ------------------------------------------------------------------------------------------------
# the shipped pipeline


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    # The toy model gains nothing from more threads, and on a busy machine more threads than free
    # cores make every step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield p
    torch.set_num_threads(threads)


def test_pipeline_is_stable_diffusion_shaped(pipe):
    unet = pipe.unet.config
    assert set(unet.down_block_types) == {"CrossAttnDownBlock2D", "DownBlock2D"}
    assert set(unet.up_block_types) == {"CrossAttnUpBlock2D", "UpBlock2D"}
    assert pipe.safety_checker is None
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    for word in (*CAPTION_WORDS, "sks"):
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert (MODEL / "tokenizer" / "vocab.json").exists() and (MODEL / "tokenizer" / "merges.txt").exists()


def test_pipeline_generates(pipe):
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(
        ["a red circle on a blue background"] * 2, num_inference_steps=4, generator=g, output_type="np"
    )
    assert out.images.shape == (2, 64, 64, 3) and out.images.dtype == np.float32
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    pt = pipe("a square", num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 64, 64) and pt.dtype == torch.float32
    pil = pipe("a square", num_inference_steps=2).images[0]
    assert pil.size == (64, 64) and pil.mode == "RGB"


def test_vae_reconstructs_a_four_by_four_pattern_on_a_24px_object(pipe):
    images = [
        render("square", "red", "blue", (30, 34), 24, pattern="checks", second_colour="white"),
        render("circle", "yellow", "green", (34, 30), 24, pattern="hstripes", second_colour="black"),
    ]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    with torch.no_grad():
        out = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    rec = ((out.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(rec - np.stack(images)).mean() < 8.0
    for image, (pattern, colours) in zip(
        rec, [("checks", ("red", "white")), ("hstripes", ("yellow", "black"))]
    ):
        obj = analyse(image).main
        assert (obj.pattern, obj.colours) == (pattern, colours), obj


def test_pipeline_follows_prompts(pipe):
    """A small, fixed slice of the benchmark in train_scripts/evaluate_toy_base.py."""
    items = make_prompts(16, seed=1)
    images = pipe(
        [it["prompt"] for it in items],
        num_inference_steps=20,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(it["seed"]) for it in items],
        output_type="np",
    ).images
    acc = score_images([(im * 255).round() for im in images], [it["prompt"] for it in items])
    assert (
        acc["shape"] >= SHAPE_FLOOR and acc["colour"] >= COLOUR_FLOOR and acc["pattern"] >= PATTERN_FLOOR
    ), acc
