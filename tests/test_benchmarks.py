"""Smoke tests: each benchmark runs end to end on tiny settings and writes its results.

The real runs (SD 1.5 UNet, toy base) take many minutes and are not part of the test suite; see the
README's Benchmarks section for their commands.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bleed, profile_step, quality, speed, subject_misses, update_norms, yardstick
from plugin.toy.analyser import analyse_subject
from plugin.toy.data import make_prompts, make_subject_images
from tests.conftest import TINY_UNET
from tests.dreambooth_fixtures import build_tiny_pipeline

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc"
)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speed") / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


TINY_SPEED = [
    "--latent-size",
    "8",
    "--warmup",
    "1",
    "--steps",
    "1",
    "--infer-steps",
    "1",
    "--load-repeats",
    "1",
]


@needs_proc
def test_speed_benchmark_measures_every_contender_and_writes_tables(tiny_config, tmp_path):
    argv = ["--config", str(tiny_config), *TINY_SPEED, "--output-dir", str(tmp_path), "--in-process"]
    payload = speed.main(argv)

    summary = payload["summary"]
    assert list(summary) == list(speed.CONTENDERS)
    attn_only = {name for name, (_, options) in speed.CONTENDERS.items() if options.get("targets") == "attn"}
    assert attn_only == {"peft-gralora", "gralora-attn"}
    for group in (attn_only, set(summary) - attn_only):  # the same targets for every contender of a group
        assert len({summary[name]["modules"] for name in group}) == 1
    assert summary["lora"]["params"] == summary["peft-lora"]["params"]  # LoRA r=8 counts as PEFT's
    # The same method has the same parameter count here as in PEFT (DoRA: its magnitudes too).
    for ours, theirs in [
        ("hira", "peft-hira"),
        ("loha", "peft-loha"),
        ("dora", "peft-dora"),
        ("ia3", "peft-ia3"),
    ]:
        assert summary[ours]["params"] == summary[theirs]["params"], ours
    assert summary["gralora-attn"]["params"] == summary["peft-gralora"]["params"]
    assert summary["loha"]["params"] == summary["lycoris-loha"]["params"]
    assert summary["flora"]["params"] < summary["peft-lora"]["params"]
    for row in summary.values():
        assert row["train_step_s"] > 0 and row["fused_s"] > 0 and row["load_fuse_s"] > 0
    assert payload["goals"] and {"met", "value", "limit"} <= set(payload["goals"][0])
    table = (tmp_path / "speed.md").read_text()
    assert "train ×PEFT" in table and "`liera-tucker-exp`" in table and "versions:" in table
    assert "| `dora` | `peft-dora` |" in table and "| `loha` | `lycoris-loha` |" in table
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert json.loads((tmp_path / "speed.json").read_text())["environment"]["versions"]["torch"]


@needs_proc
@needs_proc
def test_speed_benchmark_trains_float32_adapters_on_a_bf16_base(tiny_config, tmp_path):
    names = ["peft-lora", "lycoris-locon-tucker", "liera-tucker-exp"]
    argv = ["--config", str(tiny_config), *TINY_SPEED, "--output-dir", str(tmp_path), "--in-process"]
    payload = speed.main([*argv, "--mixed_precision", "bf16", "--contenders", *names, "--no-plot"])
    for name in names:
        run = payload["runs"][name][0]
        assert run["base_dtype"] == "torch.bfloat16", name
        assert run["trainable_dtypes"] == ["torch.float32"], name
        assert run["train_step_s"] > 0 and run["fused_vs_base"] > 0
    assert "base in bfloat16, adapters in float32" in (tmp_path / "speed.md").read_text()


def test_profile_step_times_steps_operators_and_single_layers(tiny_config, tmp_path):
    names = ["peft-lora", "liera-tucker-exp"]
    argv = ["--config", str(tiny_config), "--device", "cpu", "--latent-size", "8", "--batch", "1"]
    argv += ["--contenders", *names, "--warmup", "1", "--steps", "2", "--profile-steps", "1"]
    results = profile_step.main([*argv, "--layer-repeats", "1", "--output-dir", str(tmp_path), "--name", "p"])
    assert list(results) == names
    for result in results.values():
        assert (
            result["step_s"] > 0 and 0 < result["host_s"] <= result["step_s"] * 1.01 and result["modules"] > 0
        )
        assert result["kernels_per_step"] == 0  # no CUDA device: operators only
        assert "aten::" in result["top_host"]
        assert result["layers"], "no sampled layer found in the tiny UNet"
        assert all(row["bare"] > 0 and row["adapted"] > 0 for row in result["layers"].values())
    assert "## Training step" in (tmp_path / "p.md").read_text()
    assert json.loads((tmp_path / "p.json").read_text())["results"]["peft-lora"]["step_s"] > 0


@needs_proc
def test_speed_benchmark_runs_an_sdxl_unet_with_gradient_checkpointing(tmp_path):
    from tests import tiny_pipes

    tiny_pipes.sdxl(tmp_path / "sdxl").unet.save_config(tmp_path / "sdxl-unet")
    argv = ["--config", str(tmp_path / "sdxl-unet" / "config.json"), *TINY_SPEED, "--in-process", "--no-plot"]
    argv += [
        "--output-dir",
        str(tmp_path),
        "--gradient-checkpointing",
        "--contenders",
        "peft-lora",
        "liera-tucker-exp",
    ]
    payload = speed.main(argv)
    for run in payload["runs"].values():
        assert run[0]["train_step_s"] > 0 and run[0]["modules"] > 0 and run[0]["gradient_checkpointing"]
    assert "gradient checkpointing" in (tmp_path / "speed.md").read_text()


def test_speed_worker_runs_in_its_own_process(tiny_config):
    args = speed.parse_args(["--config", str(tiny_config), *TINY_SPEED])
    result = speed.spawn_worker(args, "liera-tucker-exp", ["--config", str(tiny_config), *TINY_SPEED])
    assert result["contender"] == "liera-tucker-exp" and result["peak_mib"] >= 0


def test_quality_benchmark_trains_judges_and_writes_tables(tmp_path):
    base = build_tiny_pipeline(tmp_path / "tiny-sd")
    argv = [
        "--base", str(base), "--subjects", "6", "--methods", "liera", "--budgets", "small", "--seeds", "0",
        "--recipes", "plain=--no-with_prior_preservation --no-train_text_encoder_ti", "defaults",
        "--max-train-steps", "2", "--train-batch-size", "1", "--num-prompts", "2", "--subject-samples", "2",
        "--class-images", "2", "--eval-timesteps", "2", "--eval-noises", "1", "--inference-steps", "2",
        "--work-dir", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    payload = quality.main(argv)

    assert [run["recipe"] for run in payload["runs"]] == ["plain", "defaults"]
    for run in payload["runs"]:
        assert run["method"] == "liera" and run["params"] > 0 and run["subject"] == "orange cross"
        for key in (
            "heldout_fit",
            "train_fit",
            "class_drift",
            "prompt_following",
            "rate_unseen",
            "shape_kept",
        ):
            assert run[key] == run[key]  # a number, not NaN
        assert run["order_kept"] is None  # a one-colour subject has no colour order
    # A recipe runs on the defaults it was measured with (PINNED_DEFAULTS), "defaults" on the script's.
    identity = {
        recipe: json.loads(next((tmp_path / "runs" / recipe).rglob("run.json")).read_text())
        for recipe in ("plain", "defaults")
    }
    assert (identity["plain"]["random_zoom"], identity["plain"]["prior_loss_weight"]) == (None, 1.0)
    assert (identity["defaults"]["random_zoom"], identity["defaults"]["prior_loss_weight"]) == (1.1, 0.5)
    subject = tmp_path / "runs" / "subjects" / "orange-cross"
    prompts = json.loads((subject / "prompts.json").read_text())
    assert len(list(subject.glob("*.png"))) == len(list((subject / "heldout").glob("*.png"))) == quality.VIEWS
    assert not set(prompts["training_backgrounds"]) & set(prompts["unseen_backgrounds"])
    # --class_captions' prompts: distinct, of the subject's class, none a prompt-following prompt.
    class_prompts = prompts["class_prompts"]
    assert len(set(class_prompts)) == len(class_prompts) == quality.CLASS_PROMPTS
    assert all(prompt.split(" on ")[0].endswith(" cross") for prompt in class_prompts)
    judged = {p["prompt"] for p in make_prompts(64, seed=quality.JUDGE_PROMPT_SEED)}
    assert not judged & set(class_prompts)
    # The defaults (prior preservation, pivotal tuning) trained on class images the base generated once
    # for the subject's class, and left the identifier's tokens beside the adapter.
    assert len(list((tmp_path / "runs" / "class" / "cross").glob("*.png"))) == quality.CLASS_IMAGES
    assert (
        tmp_path / "runs" / "defaults" / "liera-small" / "orange-cross" / "seed0" / "embeddings.safetensors"
    ).is_file()
    out = tmp_path / "out"
    assert "held-out fit ×base" in (out / "quality.md").read_text()
    assert (out / "quality_fit_vs_drift.png").stat().st_size > 0
    assert (out / "quality_samples.png").stat().st_size > 0
    # A second call reuses the finished runs instead of training again.
    adapter = tmp_path / "runs" / "plain" / "liera-small" / "orange-cross" / "seed0" / "adapter.safetensors"
    mtime = adapter.stat().st_mtime
    quality.main([*argv, "--no-plot"])
    assert adapter.stat().st_mtime == mtime
    # --reuse: a report without the run folders takes the runs as published; results judged with other
    # settings are refused, naming the setting.
    again = [*argv, "--work-dir", str(tmp_path / "empty"), "--reuse", "quality", "--no-train", "--no-plot"]
    assert quality.main([*again, "--name", "again"])["runs"] == payload["runs"]
    assert "2 of the 2 runs as published in quality.json" in (out / "again.md").read_text()
    with pytest.raises(SystemExit, match="num_prompts 2 .here 3."):
        quality.main([*again, "--num-prompts", "3"])
    # --rejudge judges the finished runs again (same numbers: the judge is seeded) without training.
    scores = tmp_path / "runs" / "plain" / "liera-small" / "orange-cross" / "seed0" / "judge.json"
    judged_at = scores.stat().st_mtime_ns
    rejudged = quality.main([*argv, "--no-plot", "--no-train", "--rejudge", "--name", "rejudged"])
    assert scores.stat().st_mtime_ns > judged_at and adapter.stat().st_mtime == mtime
    assert rejudged["runs"] == payload["runs"]

    # bleed.py reads the same runs: one row for the base and one per trained adapter, with the
    # subject's own attributes counted among the failures.
    rows = bleed.main([*argv, "--layer-kinds"])["rows"]
    assert [row["model"] for row in rows] == [
        "base",
        "liera small plain seed 0",
        "liera small defaults seed 0",
    ]
    for row in rows:
        assert 0 <= row["all right"] <= row["prompts"] == 2
        assert all(0 <= row[f"{key} wrong"] <= 2 for key in bleed.ATTRIBUTES)
    assert 0 <= rows[1]["subject's pattern instead"] <= rows[1]["pattern wrong"]
    # Prompt following with one part's adapter only: "plain" adapted the text encoder too, the defaults
    # the UNet alone (their identifier is new tokens instead).
    assert 0 <= rows[1]["all right, text_encoder adapter only"] <= 2
    assert "all right, text_encoder adapter only" not in rows[2]
    assert 0 <= rows[2]["all right, unet adapter only"] <= 2
    assert "subject's colours instead" in (out / "bleed.md").read_text()
    # --layer-kinds: one kind of the UNet's adapted layers on at a time.
    for kind in bleed.LAYER_KINDS:
        assert 0 <= rows[1][f"all right, UNet {kind} only"] <= 2

    # update_norms.py reads them too: per kind of layer, the update's size and its effective rank,
    # beyond the ranks of liera's D (2 on Linear layers, Tucker 8 on convs): W ⊙ (exp(D) - 1) is not low-rank.
    rows = update_norms.main(argv)["rows"]
    assert [row["recipe"] for row in rows] == ["plain", "defaults"]
    for row in rows:
        assert row["conv 3x3: ‖ΔW‖/‖W‖"] > 0 and row["conv 3x3: effective rank"] > 8
    assert rows[0]["linear: effective rank"] > 2 and rows[0]["text encoder: ‖ΔW‖/‖W‖"] > 0


def test_colour_order_kept_counts_mirrored_samples_of_a_one_sided_subject():
    info = quality.subject_info(5)  # the two-tone diamond, orange on the left
    assert info["pattern"] == "halves"
    views = [image for image, _ in make_subject_images(2, subject_=info)]
    views += [np.ascontiguousarray(image[:, ::-1]) for image in views]
    verdicts = [analyse_subject(image, info) for image in views]
    assert all(v["is_subject"] for v in verdicts)
    assert quality.colour_order_kept(verdicts, info) == 0.5
    assert quality.colour_order_kept(verdicts[:2], quality.subject_info(6)) is None  # one colour


def test_quality_benchmark_refuses_unknown_recipes_and_subjects():
    with pytest.raises(SystemExit):
        quality.parse_args(["--recipes", "no-such-recipe"])
    with pytest.raises(SystemExit):
        quality.parse_args(["--subjects", str(len(quality.SUBJECTS))])


def test_subject_misses_tells_a_subject_on_its_own_colour_from_one_recognised():
    from PIL import Image

    from plugin.toy.data import render_subject

    info = quality.subject_info(1)  # the blue and white vertically striped triangle
    assert "blue" in info["colours"]

    def drawn_on(background: str) -> Image.Image:
        return Image.fromarray(render_subject(background=background, subject_=info))

    assert subject_misses.why_missed(drawn_on("red"), info) == "recognised"
    assert subject_misses.why_missed(drawn_on("blue"), info) == "background of a subject colour"


def test_yardstick_trains_full_and_lora_judges_and_resumes(tmp_path):
    base = build_tiny_pipeline(tmp_path / "tiny-sd")
    argv = [
        "--base", str(base), "--subjects", "1", "--steps", "2", "--batch_size", "2", "--views", "2",
        "--samples", "1", "--inference_steps", "2", "--work_dir", str(tmp_path / "runs"),
        "--out_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    payload = yardstick.main(argv)
    assert [r["method"] for r in payload["runs"]] == ["base", "full", "lora"]
    for run in payload["runs"]:
        for prompt in ("instance prompt", "unseen backgrounds"):
            assert 0.0 <= run[prompt]["subject_rate"] <= 1.0 and 0.0 <= run[prompt]["shape_rate"] <= 1.0
    assert "description" in payload["runs"][0] and payload["runs"][1]["loss_last"] > 0
    assert "subject rate" in (tmp_path / "out" / "yardstick.md").read_text()
    assert (tmp_path / "out" / "yardstick_samples.png").stat().st_size > 0
    # A second call reuses the finished runs instead of training again.
    cached = tmp_path / "runs" / "0-lora-2-0.json"
    mtime = cached.stat().st_mtime
    assert yardstick.main(argv)["summary"] == payload["summary"] and cached.stat().st_mtime == mtime
    # Captions that name each view's background train other runs, under their own keys.
    captioned = yardstick.main([*argv, "--captions", "background", "--name", "captioned"])
    assert (tmp_path / "runs" / "0-lora-2-0-background.json").exists()
    assert captioned["runs"][0] == payload["runs"][0]  # the base is judged once
    assert (tmp_path / "out" / "captioned.md").exists()
    # The script's recipe: the text encoder trained too, with prior preservation on the base's class images.
    script = yardstick.main([*argv, "--recipe", "script", "--name", "script"])
    assert (tmp_path / "runs" / "0-full-2-0-script.json").exists()
    for plain, with_prior in zip(payload["runs"][1:], script["runs"][1:]):
        assert with_prior["trained_parameters"] > plain["trained_parameters"]
        assert (with_prior["class_images"], plain["class_images"]) == (32, 0)
    assert "--recipe script" in (tmp_path / "out" / "script.md").read_text()
