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
    SHAPES,
    ToyShapesDataset,
    make_caption,
    make_example,
    make_prompts,
    make_subject_images,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "toy-sd"
SUBJECT = ROOT / "assets" / "subject"


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


def test_dataset_items_and_captions():
    ds = ToyShapesDataset(200, seed=0)
    item = ds[0]
    x = item["pixel_values"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    seen_shapes, seen_colours = set(), set()
    for i in range(len(ds)):
        it = ds[i]
        words = it["caption"].split()
        assert set(words) <= set(CAPTION_WORDS), it["caption"]
        assert it["shape"] in words and it["colour"] != it["background"]
        seen_shapes.add(it["shape"])
        seen_colours.add(it["colour"])
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS)
    assert make_caption("circle", "red", "blue") == "a red circle on a blue background"
    assert make_caption("square", "orange", "orange") == "an orange square on an orange background"
    assert make_caption("triangle") == "a triangle"


def test_eval_prompts_are_balanced_and_fixed():
    prompts = make_prompts(64, seed=0)
    assert prompts == make_prompts(64, seed=0) and len(prompts) == 64
    assert {p["shape"] for p in prompts} == set(SHAPES) and {p["colour"] for p in prompts} == set(COLOURS)
    assert all(
        parse_prompt(p["prompt"]) == {k: p[k] for k in ("colour", "shape", "background")} for p in prompts
    )


# ------------------------------------------------------------------------------------------------
# analyser


def _box_blur(img: np.ndarray, passes: int = 2) -> np.ndarray:
    out = img.astype(np.float32)
    for _ in range(passes):
        p = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        out = sum(p[dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)) / 9.0
    return out


def test_analyser_reads_the_generators_images():
    n, ok = 300, {"colour": 0, "shape": 0, "background": 0}
    for i in range(n):
        ex = make_example(50_000 + i)
        a = analyse(ex.image)
        ok["colour"] += a.colour == ex.colour
        ok["shape"] += a.shape == ex.shape
        ok["background"] += a.background == ex.background
    assert all(v / n >= 0.95 for v in ok.values()), ok


def test_analyser_is_robust_to_blur_and_noise():
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(100):
        ex = make_example(60_000 + i)
        images.append(np.clip(_box_blur(ex.image) + rng.normal(0, 6, ex.image.shape), 0, 255))
        prompts.append(make_caption(ex.shape, ex.colour, ex.background))
    acc = score_images(images, prompts)
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.85 and acc["background"] >= 0.95, acc


def test_analyser_edge_cases():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert not analyse(flat).found
    img = render("triangle", "green", "white", (30, 34), 36)
    assert score_image(img, "a green triangle on a white background") == {
        "colour": True,
        "shape": True,
        "background": True,
    }
    assert score_image(img, "a red square") == {"colour": False, "shape": False, "background": None}


def test_subject_is_recognised_and_new():
    for image, _ in make_subject_images():
        assert analyse_subject(image)["is_subject"]
    assert not any(analyse_subject(make_example(i).image)["is_subject"] for i in range(100))


def test_shipped_subject_matches_its_generator():
    from PIL import Image

    prompts = json.loads((SUBJECT / "prompts.json").read_text())
    assert {"instance_prompt", "class_prompt"} <= set(prompts)
    files = sorted(SUBJECT.glob("*.png"))
    assert 4 <= len(files) <= 6
    for f, (image, _) in zip(files, make_subject_images(len(files))):
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), image)


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


def test_pipeline_follows_prompts(pipe):
    """A small, fixed slice of the benchmark in train_scripts/evaluate_toy_base.py."""
    items = make_prompts(8, seed=1)
    images = pipe(
        [it["prompt"] for it in items],
        num_inference_steps=20,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(it["seed"]) for it in items],
        output_type="np",
    ).images
    acc = score_images([(im * 255).round() for im in images], [it["prompt"] for it in items])
    assert acc["colour"] >= 0.75 and acc["shape"] >= 0.75, acc
