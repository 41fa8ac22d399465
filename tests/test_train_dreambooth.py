"""The DreamBooth script, run as users run it: `accelerate launch` in a subprocess, on a tiny random
pipeline. Short runs of each method, a killed-and-resumed run, a two-process run, bad arguments."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import plugin
from tests.conftest import DREAMBOOTH_SCRIPT
from tests.dreambooth_fixtures import RESOLUTION, build_tiny_pipeline, make_subject

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = DREAMBOOTH_SCRIPT
CPU_2PROC = ROOT / "train_scripts" / "accelerate_cpu_2proc.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SINGLE = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# Most runs start as `python train_dreambooth_liera.py ...` (a way users run it too): no launcher process,
# whose own start (torch imported once more) cost ~3 s a run. The shared reference runs, the killed runs,
# the families' runs and the multi-process ones go through `accelerate launch`.
DIRECT = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dreambooth")
    return {
        "base": build_tiny_pipeline(root / "tiny-sd"),
        "subject": make_subject(root / "subject"),
        "root": root,
    }


def train_args(tiny: dict[str, Path], output_dir: Path, method: str = "liera", *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny["base"]),
        "--instance_data_dir", str(tiny["subject"]),
        "--output_dir", str(output_dir),
        "--adapter", method,
        "--rank", "4",
        "--resolution", str(RESOLUTION),
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--checkpointing_steps", "2",
        "--num_validation_images", "0",
        "--num_drift_images", "2",
        "--num_class_images", "2",  # prior preservation is on by default
        # The UNet alone (the tests load the files into a UNet): no text encoder adapters, no new tokens.
        "--no-train_text_encoder",
        "--no-train_text_encoder_ti",
        *extra,
    ]  # fmt: skip


def launch(script_args: list[str], launcher_args: list[str] | None = DIRECT, **popen) -> subprocess.Popen:
    launcher = [] if launcher_args is None else ["-m", "accelerate.commands.launch", *launcher_args]
    command = [sys.executable, *launcher, str(SCRIPT), *script_args]
    return subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def run(script_args: list[str], launcher_args: list[str] | None = DIRECT, timeout: float = 180) -> str:
    process = launch(script_args, launcher_args)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


_REFERENCE: dict[str, Path] = {}
_DURATION: dict[str, float] = {}  # seconds the reference run took, launcher included
# The liera runs also make validation grids (before, at step 2, final).
VALIDATION = ["--num_validation_images", "1", "--validation_inference_steps", "2", "--validation_steps", "2"]


def reference_run(tiny: dict[str, Path], method: str) -> Path:
    """One uninterrupted 4-step run per method, shared by the tests that need it."""
    if method not in _REFERENCE:
        output_dir = tiny["root"] / f"reference-{method}"
        start = time.time()
        run(train_args(tiny, output_dir, method, *(VALIDATION if method == "liera" else [])), SINGLE)
        _DURATION[method] = time.time() - start
        _REFERENCE[method] = output_dir
    return _REFERENCE[method]


def unet_output(base: Path, adapter: Path | None = None) -> torch.Tensor:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    if adapter is not None:
        plugin.load_adapter(adapter, {"unet": unet})
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 16, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), hidden).sample


@pytest.mark.parametrize("method", ["liera", "flora", "lora", "dora"])
def test_short_run_writes_a_loadable_adapter_that_changes_the_model(tiny, method):
    output_dir = reference_run(tiny, method)
    adapter = output_dir / "adapter.safetensors"
    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == ("liera/2" if method == "dora" else "liera/1")
    assert json.loads(metadata["config"])["method"] == method
    assert metadata["base_model"] == str(tiny["base"])
    # Loadable into a fresh copy of the base, and trained: the adapter moved the model away from it.
    difference = (unet_output(tiny["base"], adapter) - unet_output(tiny["base"])).abs().max().item()
    assert difference > 1e-6
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    # Fit on the 3 training images, generalisation to the 2 of heldout/, drift on 2 generated class images.
    counts = [metrics[f"num_{kind}_images"] for kind in ["train", "heldout", "drift"]]
    assert counts == [3, 2, 2]
    # Prior preservation (on by default) trains on class_images/; the drift is measured on other samples.
    trained_on = {path.read_bytes() for path in (output_dir / "class_images").glob("*.png")}
    drift = list((output_dir / "drift_class_images").glob("*.png"))
    assert len(trained_on) == len(drift) == 2 and not trained_on & {path.read_bytes() for path in drift}
    # ... and shows them in one grid, to look at (a row of the two, each 128 pixels).
    assert Image.open(output_dir / "class_images.png").size == (2 * 128, 128)
    for name in ["train_images_loss", "heldout_loss", "class_loss"]:
        assert 0 < metrics[f"{name}_before"] < math.inf and 0 < metrics[f"{name}_after"] < math.inf, name
    assert metrics["heldout_loss_ratio"] == pytest.approx(
        metrics["heldout_loss_after"] / metrics["heldout_loss_before"]
    )
    assert metrics["prior_drift_percent"] == pytest.approx(
        100 * (metrics["class_loss_after"] / metrics["class_loss_before"] - 1)
    )
    # Evaluated before training, every --validation_steps (2 for liera, 250 for the others) and at the end.
    assert [step for step, _ in metrics["heldout_curve"]] == ([0, 2, 4] if method == "liera" else [0, 4])
    assert metrics["heldout_curve"][0][1] == pytest.approx(metrics["heldout_loss_before"], rel=1e-4)
    assert metrics["heldout_curve"][-1][1] == pytest.approx(metrics["heldout_loss_after"], rel=1e-4)
    assert metrics["adapter_step"] == 4 and metrics["best_step"] in (0, 2, 4)
    # The saved file reproduces the trained model; the layer the adapter changes most is named.
    assert metrics["saved_vs_trained_max_abs_diff"] < 1e-5
    assert 0 < metrics["largest_relative_weight_change"] < 1
    assert metrics["largest_weight_change_module"].startswith("unet.")
    card = (output_dir / "README.md").read_text()
    # Tucker convolutions (flora, liera) without --conv_rank: [c, c, 2, 2] with c above --rank (plugin.budget).
    conv_rank = metrics["conv_rank"]
    if method in ("liera", "flora"):
        assert conv_rank[0] == conv_rank[1] > 4 and conv_rank[2:] == [2, 2]
        with safe_open(str(adapter), framework="pt") as handle:
            cores = [handle.get_slice(k).get_shape() for k in handle.keys() if k.endswith("tucker_core")]
        assert {tuple(shape[2:]) for shape in cores if len(shape) == 4} == {(2, 2), (1, 1)}  # 3x3 and 1x1
    else:
        assert conv_rank == 4
    assert f"conv rank {conv_rank}" in card
    weight = json.loads((output_dir / "run.json").read_text())["prior_loss_weight"]
    assert f'prior preservation with "a circle" at weight {weight:g}' in card
    for row in ["training images (fit)", "held-out images (generalisation)", "class images (prior drift)"]:
        assert f"| {row}" in card, row
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (output_dir / "checkpoint-2" / "adapter.safetensors").is_file()
    assert not list((output_dir / "checkpoint-2").glob("*model*"))  # no pickled model weights
    if method == "liera":
        for name in ["before", "final", "before_after", "step-000002"]:
            assert (output_dir / "validation" / f"{name}.png").is_file(), name


def assert_same_adapter(output_dir: Path, reference: Path, atol: float = 1e-6) -> None:
    """The run in `output_dir` ended with the reference run's adapter (to float32 rounding, or `atol`)."""
    expected, resumed = (
        load_file(reference / "adapter.safetensors"),
        load_file(output_dir / "adapter.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=atol)


def test_a_killed_run_resumed_from_latest_reaches_the_same_adapter(tiny):
    reference = reference_run(tiny, "liera")
    output_dir = tiny["root"] / "killed"
    args = train_args(tiny, output_dir, "liera", *VALIDATION)
    process = launch(args, SINGLE, start_new_session=True)
    deadline = time.time() + 180
    while not (output_dir / "checkpoint-2").is_dir():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.time() < deadline, "no checkpoint-2 in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training process, no clean-up
    process.communicate()
    assert not (output_dir / "adapter.safetensors").exists(), "the run finished before it could be killed"

    output = run([*args, "--resume_from_checkpoint", "latest"])
    assert "Resuming from checkpoint" in output
    assert "Generating" not in output  # the drift measure's class images were made once, before training
    assert_same_adapter(output_dir, reference)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["losses"] == pytest.approx(reference_metrics["losses"], abs=1e-5)
    # The held-out curve up to step 2 comes from the checkpoint.
    curve, reference_curve = metrics["heldout_curve"], reference_metrics["heldout_curve"]
    assert [step for step, _ in curve] == [step for step, _ in reference_curve] == [0, 2, 4]
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in reference_curve], abs=1e-5)


def test_two_cpu_processes_end_with_identical_adapters(tiny):
    output_dir = tiny["root"] / "two-processes"
    run([*train_args(tiny, output_dir), "--save_every_rank"], ["--config_file", str(CPU_2PROC)])
    rank0 = load_file(output_dir / "adapter_rank0.safetensors")
    rank1 = load_file(output_dir / "adapter_rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["max_abs_diff_between_ranks"] == 0
    assert [step for step, _ in metrics["heldout_curve"]] == [0, 4]  # on the main process, no deadlock


def test_captions_give_each_instance_and_class_image_its_own_prompt(tiny):
    """`--instance_captions`: a `<stem>.txt` beside an image wins over prompts.json's "captions".
    `--class_captions`: the class images are generated from prompts.json's "class_prompts" in turn,
    each saved with its caption, and trained with it."""
    from transformers import CLIPTokenizer

    from plugin.training import DreamBoothDataset, tokenize_prompt

    subject = tiny["root"] / "captioned"
    shutil.copytree(tiny["subject"], subject)
    (subject / "subject_0.txt").write_text("a sks circle, from its text file\n")
    prompts = json.loads((subject / "prompts.json").read_text())
    class_prompts = ["a red circle", "a striped circle on a blue background", "a dotted circle"]
    (subject / "prompts.json").write_text(json.dumps({**prompts, "class_prompts": class_prompts}))
    output_dir = tiny["root"] / "captions"
    output = run(train_args(tiny, output_dir, "liera", "--instance_data_dir", str(subject),
                            "--instance_captions", "--class_captions"))  # fmt: skip
    assert "Prompts = per-image captions (3 distinct)" in output
    assert "Generating 2 class images for 3 class prompts" in output
    assert json.loads((output_dir / "metrics.json").read_text())["steps"] == 4
    class_images = sorted((output_dir / "class_images").glob("*.png"))
    captions = [image.with_suffix(".txt").read_text().strip() for image in class_images]
    assert captions == class_prompts[:2]

    tokenizer = CLIPTokenizer.from_pretrained(tiny["base"], subfolder="tokenizer")
    prompts = ["a sks circle, from its text file", "a sks circle on a blue background", "a sks circle"]
    images = sorted(subject.glob("*.png"))
    dataset = DreamBoothDataset(
        images, "unused", tokenizer, RESOLUTION, instance_prompts=prompts, class_images=class_images,
        class_prompt="unused", class_prompts=captions,
    )  # fmt: skip
    for index, prompt in enumerate(prompts):
        assert torch.equal(dataset[index]["instance_prompt_ids"], tokenize_prompt(tokenizer, prompt)[0])
        class_prompt = captions[index % len(captions)]
        assert torch.equal(dataset[index]["class_prompt_ids"], tokenize_prompt(tokenizer, class_prompt)[0])


def test_held_out_instance_images_are_measured_not_trained_on(tiny):
    """--num_heldout_images 1 of 3 instance images, plus the 2 of heldout/; no class prompt: no drift.
    With --instance_captions, --random_flip and --random_zoom, which the model card names together."""
    subject = tiny["root"] / "no-class-prompt"
    shutil.copytree(tiny["subject"], subject)
    prompts = json.loads((subject / "prompts.json").read_text())
    del prompts["class_prompt"]
    (subject / "prompts.json").write_text(json.dumps(prompts))
    output_dir = tiny["root"] / "heldout-instances"
    output = run(train_args(tiny, output_dir, "liera", "--instance_data_dir", str(subject),
                            "--num_heldout_images", "1", "--no-with_prior_preservation",
                            "--instance_captions", "--random_flip", "--random_zoom", "1.2"))  # fmt: skip
    assert "Num examples = 2" in output and "Num held-out images = 3" in output
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert (metrics["num_train_images"], metrics["num_heldout_images"]) == (2, 3)
    assert 0 < metrics["heldout_loss_before"] < math.inf and 0 < metrics["heldout_loss_after"] < math.inf
    assert "Prior drift: not measured, no class prompt (give --class_prompt" in output
    assert metrics["num_drift_images"] == 0 and not (output_dir / "drift_class_images").exists()
    assert (
        metrics["class_loss_before"] is metrics["class_loss_after"] is metrics["prior_drift_percent"] is None
    )
    card = (output_dir / "README.md").read_text()
    assert "n/a: no class prompt" in card
    assert (
        "(each with its own caption; mirrored half the time, --random_flip; enlarged up to 1.2x, --random_zoom)"
        in card
    )


@pytest.mark.parametrize("pivotal", [False, True])
def test_keep_best_heldout_saves_the_adapter_of_the_lowest_heldout_loss(tiny, pivotal):
    """A learning rate this high overshoots at step 3 on the tiny model, so the best is an earlier step.
    With pivotal tuning the identifier's embeddings of that step are kept too."""
    output_dir = tiny["root"] / f"keep-best-{pivotal}"
    extra = ["--train_text_encoder_ti", "--text_encoder_lr", "0.3"] if pivotal else []
    output = run(train_args(tiny, output_dir, "liera", "--keep_best_heldout", "--validation_steps", "1",
                            "--checkpointing_steps", "1", "--max_train_steps", "3", "--learning_rate", "0.3",
                            "--conv_learning_rate", "0.3", "--conv_rank", "4",  # ranks this rate stays finite at
                            "--num_drift_images", "0", *extra))  # fmt: skip
    metrics = json.loads((output_dir / "metrics.json").read_text())
    curve = metrics["heldout_curve"]
    assert [step for step, _ in curve] == [0, 1, 2, 3]
    best = min(curve, key=lambda point: point[1])[0]
    assert metrics["best_step"] == metrics["adapter_step"] == best
    assert 0 < best < 3, curve  # else this test checks less than it means to
    assert f"Keeping the adapter of step {best}" in output
    assert metrics["heldout_loss_after"] == pytest.approx(curve[best][1], rel=1e-4)
    saved, checkpoint = (
        load_file(output_dir / "adapter.safetensors"),
        load_file(output_dir / f"checkpoint-{best}" / "adapter.safetensors"),
    )
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)
    assert "Prior drift: not measured (--num_drift_images 0)" in output
    if pivotal:
        saved, checkpoint = (
            load_file(output_dir / "embeddings.safetensors"),
            load_file(output_dir / f"checkpoint-{best}" / "embeddings.safetensors"),
        )
        assert torch.equal(saved["emb_params"], checkpoint["emb_params"])
        last = load_file(output_dir / "checkpoint-3" / "embeddings.safetensors")
        assert not torch.equal(saved["emb_params"], last["emb_params"])


def test_denoising_loss_takes_one_prompt_or_one_per_image(tiny):
    from diffusers import StableDiffusionPipeline

    from plugin.training import denoising_loss, load_rgb

    pipe = StableDiffusionPipeline.from_pretrained(tiny["base"])
    images = [load_rgb(path) for path in sorted(tiny["subject"].glob("*.png"))[:2]]

    def loss(prompt):
        return denoising_loss(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                              images, prompt, RESOLUTION, num_timesteps=2)  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait on each other
    try:
        assert loss("a sks circle") == loss(["a sks circle", "a sks circle"])
        assert loss("a sks circle") != loss(["a sks circle", "a red square"])
        with pytest.raises(ValueError, match="1 prompts for 2 images"):
            loss(["a sks circle"])
    finally:
        torch.set_num_threads(threads)


# --- bad arguments: refused while parsing, before torch and diffusers are even imported ---------


def refusal(script, capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        script.parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_are_refused_with_a_message_naming_them(tiny, script, capsys, tmp_path):
    base = ["--pretrained_model_name_or_path", str(tiny["base"])]
    data = ["--instance_data_dir", str(tiny["subject"])]

    message = refusal(script, capsys, [*base, "--instance_data_dir", str(tmp_path / "nowhere")])
    assert "--instance_data_dir: no such directory" in message and "nowhere" in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    message = refusal(script, capsys, [*base, "--instance_data_dir", str(tmp_path / "empty")])
    assert "holds no images" in message and "empty" in message
    assert "--rank must be a positive integer, got 0" in refusal(
        script, capsys, [*base, *data, "--rank", "0"]
    )
    assert "invalid choice: 'dorra'" in refusal(script, capsys, [*base, *data, "--adapter", "dorra"])
    assert "blocks does not apply to the lowrank" in refusal(
        script, capsys, [*base, *data, "--adapter", "lora", "--blocks", "4"]
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "photo.png").write_bytes(b"this is not a PNG")
    message = refusal(
        script, capsys, [*base, "--instance_data_dir", str(broken), "--instance_prompt", "a sks x"]
    )
    assert "photo.png is not a readable image" in message
    uncaptioned = tmp_path / "uncaptioned"
    shutil.copytree(tiny["subject"], uncaptioned)
    prompts = json.loads((uncaptioned / "prompts.json").read_text())
    del prompts["captions"]["subject_1.png"]
    (uncaptioned / "prompts.json").write_text(json.dumps(prompts))
    message = refusal(script, capsys, [*base, "--instance_data_dir", str(uncaptioned), "--instance_captions"])
    assert "--instance_captions:" in message and "subject_1.png has no caption" in message
    message = refusal(
        script, capsys, [*base, *data, "--class_captions", "--class_data_dir", str(tmp_path / "none")]
    )
    assert "--class_captions: 100 class images are missing" in message and '"class_prompts"' in message
    uncaptioned_class = tmp_path / "uncaptioned-class"
    shutil.copytree(tiny["subject"], uncaptioned_class, ignore=shutil.ignore_patterns("heldout", "*.json"))
    message = refusal(
        script, capsys, [*base, *data, "--class_captions", "--class_data_dir", str(uncaptioned_class)]
    )
    assert "--class_captions: class image" in message and "subject_0.png has no caption" in message
    message = refusal(script, capsys, [*base, *data, "--class_captions", "--no-with_prior_preservation"])
    assert "--class_captions captions the prior-preservation images" in message
    message = refusal(script, capsys, [*base, *data, "--num_heldout_images", "3"])
    assert "--num_heldout_images 3" in message and "has 3 images and at least one must train" in message
    assert "--num_heldout_images must be 0 or more, got -1" in refusal(
        script, capsys, [*base, *data, "--num_heldout_images", "-1"]
    )
    message = refusal(script, capsys, [*base, *data, "--heldout_data_dir", str(tmp_path / "nowhere")])
    assert "--heldout_data_dir: no such directory" in message and "nowhere" in message
    message = refusal(script, capsys, [*base, *data, "--heldout_data_dir", str(tmp_path / "empty")])
    assert "--heldout_data_dir:" in message and "empty holds no images" in message
    no_heldout = tmp_path / "no-heldout"
    shutil.copytree(tiny["subject"], no_heldout, ignore=shutil.ignore_patterns("heldout"))
    message = refusal(script, capsys, [*base, "--instance_data_dir", str(no_heldout), "--keep_best_heldout"])
    assert "--keep_best_heldout needs held-out images" in message
    message = refusal(script, capsys, [*base, *data, "--random_zoom", "0.8"])
    assert "--random_zoom must be at least 1 (1: no zoom), got 0.8" in message
    classless = tmp_path / "classless"
    shutil.copytree(tiny["subject"], classless)
    prompts = json.loads((classless / "prompts.json").read_text())
    del prompts["class_prompt"]
    (classless / "prompts.json").write_text(json.dumps(prompts))
    message = refusal(script, capsys, [*base, "--instance_data_dir", str(classless)])
    assert "prior preservation (on by default) needs a class prompt" in message
    assert "--class_prompt" in message and "--no-with_prior_preservation" in message
    assert "--conv_rank" in refusal(
        script, capsys, [*base, *data, "--adapter", "lora", "--conv_rank", "4", "4", "1", "1"]
    )
    message = refusal(
        script, capsys, [*base, *data, "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")]
    )
    assert "--resume_from_checkpoint: no checkpoint" in message
    message = refusal(script, capsys, [*data, "--pretrained_model_name_or_path", str(tmp_path / "no-model")])
    assert "--pretrained_model_name_or_path: no such directory" in message


def test_an_sdxl_refiner_is_refused_clearly(script, capsys, tiny, tmp_path):
    """SDXL base models train (tests/test_train_families.py); a refiner has no first text encoder."""
    xl = tmp_path / "sdxl-refiner"
    (xl / "unet").mkdir(parents=True)
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}
    (xl / "model_index.json").write_text(json.dumps(index))
    (xl / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    message = refusal(
        script,
        capsys,
        ["--pretrained_model_name_or_path", str(xl), "--instance_data_dir", str(tiny["subject"])],
    )
    assert "it is an SDXL refiner" in message and "train the SDXL base model" in message


def test_defaults_read_the_prompts_of_the_instance_folder(script, tiny, capsys):
    args = script.parse_args(
        ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    )
    # Pivotal tuning is on by default for liera on SD: 'sks' becomes two new tokens in every prompt.
    assert args.train_text_encoder_ti and not args.train_text_encoder
    assert args.targets == "cross-kv+conv" and args.text_encoder_lr == script.DEFAULT_TOKEN_LEARNING_RATE
    assert args.instance_prompt == "a <s0><s1> circle"
    assert args.class_prompt == "a circle"  # read without --with_prior_preservation too: the drift measure
    assert args.validation_prompts == ["a <s0><s1> circle", "a <s0><s1> circle on a blue background"]
    # heldout/ is the default held-out set, never trained on.
    assert args.heldout_data_dir == str(tiny["subject"] / "heldout")
    assert [Path(p).name for p in args.train_images] == ["subject_0.png", "subject_1.png", "subject_2.png"]
    assert [Path(p).name for p in args.heldout_images] == ["0.png", "1.png"]
    assert args.heldout_prompts == ["a <s0><s1> circle"] * 2
    assert args.output_dir == os.path.join("outputs", "dreambooth-liera")
    assert args.with_prior_preservation  # on by default (benchmarks/quality.py's sweep)
    assert args.class_data_dir == os.path.join("outputs", "dreambooth-liera", "class_images")
    # With pivotal tuning's defaults liera trains longer, on zoomed views (PIVOTAL_TRAINING).
    assert (args.max_train_steps, args.random_zoom) == (1200, 1.1)
    # With pivotal tuning's targets, liera's keys and values train at their own rate.
    assert (args.learning_rate, args.conv_learning_rate) == script.PIVOTAL_LEARNING_RATES["liera"]
    # liera weighs its class images half with pivotal tuning (PIVOTAL_TRAINING); lora and flora 3x.
    assert args.prior_loss_weight == 0.5
    base = ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    lora = script.parse_args([*base, "--adapter", "lora"])
    assert lora.prior_loss_weight == 3.0
    assert (lora.learning_rate, lora.conv_learning_rate) == script.PIVOTAL_LEARNING_RATES["lora"]
    flora = script.parse_args([*base, "--adapter", "flora"])
    assert flora.prior_loss_weight == 3.0
    assert (flora.learning_rate, flora.conv_learning_rate) == script.PIVOTAL_LEARNING_RATES["flora"]
    # lora and flora keep the length and the views they were measured with; a given length or zoom is kept.
    assert (
        (lora.max_train_steps, lora.random_zoom) == (flora.max_train_steps, flora.random_zoom) == (800, None)
    )
    given = script.parse_args([*base, "--max_train_steps", "300", "--random_zoom", "1"])
    # No zoom is one setting (None) to resume by, whether asked for (1) or left off (as before the default).
    assert (given.max_train_steps, given.random_zoom) == (300, None)
    assert script.run_identity(given)["random_zoom"] is script.run_identity(lora)["random_zoom"] is None
    assert script.parse_args([*base, "--num_train_epochs", "2"]).max_train_steps is None
    assert (
        script.parse_args([*base, "--adapter", "lora", "--prior_loss_weight", "1"]).prior_loss_weight == 1.0
    )
    # A preset the quality benchmark has not measured keeps the text encoder adapted, on attn+conv.
    hira = script.parse_args([*base, "--adapter", "hira"])
    assert not hira.train_text_encoder_ti and hira.train_text_encoder and hira.targets == "attn+conv"
    assert hira.instance_prompt == "a sks circle" and hira.text_encoder_lr is None
    assert (hira.max_train_steps, hira.random_zoom) == (script.DEFAULT_MAX_TRAIN_STEPS, None)
    assert hira.prior_loss_weight == 1.0  # diffusers' weight
    # liera without pivotal tuning keeps the length, the views and the prior's weight it had before.
    plain = script.parse_args([*base, "--no-train_text_encoder_ti"])
    assert (plain.max_train_steps, plain.random_zoom, plain.prior_loss_weight) == (800, None, 1.0)
    # Pivotal tuning needs the identifier in the prompt: a prompt without it is refused, naming the way out.
    refused = ["--instance_prompt", "a zwx circle"]
    assert "'sks' is not in the instance prompt" in refusal(script, capsys, [*base, *refused])
    assert script.parse_args([*base, *refused, "--no-train_text_encoder_ti"]).train_text_encoder
    # --train_text_encoder asks for the earlier recipe: the text encoder adapted, no new tokens, attn+conv.
    adapted = script.parse_args([*base, *refused, "--train_text_encoder"])
    assert not adapted.train_text_encoder_ti and adapted.targets == "attn+conv"
    assert (
        script.parse_args([*base, *refused, "--token_abstraction", "zwx"]).instance_prompt
        == "a <s0><s1> circle"
    )


def test_a_hub_models_defaults_wait_for_its_family(script, tiny, tmp_path):
    """A hub id's family is read in `main` (from its configs, before any weights load): the defaults that
    depend on it, and the check of --output_dir, come then, through the same functions."""
    from plugin.families import FAMILIES

    output_dir = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", "someone/a-model", "--instance_data_dir", str(tiny["subject"]),
            "--output_dir", str(output_dir)]  # fmt: skip
    args = script.parse_args(argv)
    assert args.family is None and args.train_text_encoder_ti is None and args.targets is None
    assert args.instance_prompt == "a sks circle"
    assert script.family_settings(FAMILIES["sd"], args) is None
    assert args.train_text_encoder_ti and not args.train_text_encoder and args.targets == "cross-kv+conv"
    assert args.instance_prompt == "a <s0><s1> circle"
    assert (args.max_train_steps, args.random_zoom) == (1200, 1.1)  # liera's, with pivotal tuning
    output_dir.mkdir()
    (output_dir / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="holds a finished run"):
        script.check_output_dir(script.SystemExitParser(), args)
    # Flux has no CLIP tokens to learn: its defaults adapt the text encoder, and asking for tokens is refused.
    flux = script.parse_args(argv)
    assert script.family_settings(FAMILIES["flux"], flux) is None
    assert not flux.train_text_encoder_ti and flux.train_text_encoder and flux.targets == "attn+conv"
    assert (flux.max_train_steps, flux.random_zoom) == (script.DEFAULT_MAX_TRAIN_STEPS, None)
    refused = script.family_settings(FAMILIES["flux"], script.parse_args([*argv, "--train_text_encoder_ti"]))
    assert "--train_text_encoder_ti learns CLIP token embeddings" in refused


def test_images_held_out_of_the_instance_folder_are_a_seeded_choice(script, tiny):
    base = ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    held = ["--num_heldout_images", "1", "--instance_captions", "--no-train_text_encoder_ti"]
    args = script.parse_args([*base, *held])
    assert script.parse_args([*base, *held]).heldout_images == args.heldout_images  # deterministic
    chosen = Path(args.heldout_images[0])
    assert chosen.parent == tiny["subject"] and str(chosen) not in args.train_images
    assert len(args.train_images) == 2 and len(args.instance_prompts) == 2
    assert [Path(p).parent.name for p in args.heldout_images[1:]] == ["heldout", "heldout"]
    # Each captioned as training would: its own caption, the heldout/ ones from prompts.json's "heldout".
    captions = json.loads((tiny["subject"] / "prompts.json").read_text())["captions"]
    assert args.heldout_prompts == [captions[chosen.name]] + ["a sks circle on an orange background"] * 2
    others = {script.parse_args([*base, *held, "--seed", str(seed)]).heldout_images[0] for seed in range(8)}
    assert len(others) > 1  # the seed chooses


def test_a_run_older_than_an_option_resumes_unless_the_option_is_set(script, tiny, tmp_path):
    """run.json written before --random_flip existed: the same run without the flag, another with it."""
    base = ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    identity = script.run_identity(script.parse_args(base))
    record = tmp_path / "run.json"
    record.write_text(json.dumps({key: value for key, value in identity.items() if key != "random_flip"}))
    assert script.identity_differences(record, identity) == []
    flipped = script.run_identity(script.parse_args([*base, "--random_flip"]))
    assert script.identity_differences(record, flipped) == ["random_flip"]
    record.write_text(json.dumps(identity))
    assert script.identity_differences(record, flipped) == ["random_flip"]


def test_a_bad_argument_stops_the_launched_script_before_any_model_loads(tiny, tmp_path):
    output_dir = tmp_path / "never"
    process = launch(train_args(tiny, output_dir, "liera", "--rank", "0"))
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "--rank must be a positive integer, got 0" in output
    assert "Loading" not in output and not output_dir.exists()


@pytest.mark.parametrize("method", ["liera", "flora"])
def test_bf16_mixed_precision_trains_float32_adapters(tiny, method):
    """`--mixed_precision bf16` (autocast on the CPU, as fp16/bf16 on a GPU): the base runs in bf16,
    the adapters rebuild and train in float32, and the run learns like the float32 one."""
    output_dir = tiny["root"] / f"bf16-{method}"
    run(train_args(tiny, output_dir, method, "--mixed_precision", "bf16"))
    with safe_open(str(output_dir / "adapter.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float32}
    metrics = json.loads((output_dir / "metrics.json").read_text())
    reference = json.loads((reference_run(tiny, method) / "metrics.json").read_text())
    assert all(math.isfinite(loss) for loss in metrics["losses"])
    torch.testing.assert_close(
        torch.tensor(metrics["losses"]), torch.tensor(reference["losses"]), rtol=0.1, atol=0.02
    )
    difference = unet_output(tiny["base"], output_dir / "adapter.safetensors") - unet_output(tiny["base"])
    assert difference.abs().max().item() > 1e-6


def test_an_output_dir_holding_another_run_is_refused_and_checkpoints_must_match(
    script, tiny, capsys, tmp_path
):
    reference = reference_run(tiny, "liera")
    same = train_args(tiny, reference, "liera", *VALIDATION)
    message = refusal(script, capsys, same)
    assert (
        f"--output_dir {reference} holds checkpoints at steps 2, 4" in message
        and "other settings" not in message
    )
    assert "--overwrite_output_dir to start over" in message
    other = train_args(tiny, reference, "liera", "--rank", "8", *VALIDATION)  # the later --rank wins: 8
    assert "with other settings (rank)" in refusal(script, capsys, other)
    assert "from a run with other settings (rank)" in refusal(
        script, capsys, [*other, "--resume_from_checkpoint", "latest"]
    )
    script.parse_args([*same, "--resume_from_checkpoint", "latest"])  # the same run: fine
    script.parse_args([*same, "--overwrite_output_dir"])  # starting over, asked for: fine
    before = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in reference.iterdir()) == before  # parsing changed nothing


def test_a_diverged_run_stops_naming_the_step_and_saves_nothing(tiny):
    # The losses are read every few steps (StepLosses), so the step named is the first non-finite one.
    output_dir = tiny["root"] / "diverged"
    process = launch(
        train_args(tiny, output_dir, "lora", "--learning_rate", "1e12", "--max_train_steps", "6")
    )
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    diverged = re.search(r"The loss is (\S+) at step (\d+): training diverged", output)
    assert diverged, output[-4000:]
    assert not math.isfinite(float(diverged[1])) and 1 <= int(diverged[2]) <= 6
    assert not (output_dir / "adapter.safetensors").exists()
    checkpoints = [int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*")]
    assert all(step < int(diverged[2]) for step in checkpoints)


def test_a_damaged_checkpoint_is_named(tiny):
    reference = reference_run(tiny, "liera")
    output_dir = tiny["root"] / "damaged"
    shutil.copytree(reference / "checkpoint-2", output_dir / "checkpoint-2")
    (output_dir / "run.json").write_text((reference / "run.json").read_text())
    optimizer = next((output_dir / "checkpoint-2").glob("optimizer*"))
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    process = launch(
        [*train_args(tiny, output_dir, "liera", *VALIDATION), "--resume_from_checkpoint", "latest"]
    )
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert f"--resume_from_checkpoint: {output_dir / 'checkpoint-2'} is damaged" in output, output[-3000:]
    assert not (output_dir / "adapter.safetensors").exists()


def test_a_checkpoint_of_other_conv_ranks_names_the_option_to_resume_it(tiny):
    """A run begun when a Tucker convolution's default ranks were --rank's (here rewritten into a copy of
    a checkpoint's adapter) is refused before loading, with the --conv_rank that resumes it."""
    reference = reference_run(tiny, "liera")
    output_dir = tiny["root"] / "old-conv-ranks"
    shutil.copytree(reference / "checkpoint-2", output_dir / "checkpoint-2")
    (output_dir / "run.json").write_text((reference / "run.json").read_text())
    adapter = output_dir / "checkpoint-2" / "adapter.safetensors"
    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["config"])
    assert config["conv_rank"][2:] == [2, 2]  # the matched default
    save_file(load_file(adapter), adapter, {**metadata, "config": json.dumps({**config, "conv_rank": None})})
    process = launch(
        [*train_args(tiny, output_dir, "liera", *VALIDATION), "--resume_from_checkpoint", "latest"]
    )
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert "was trained with conv rank 4" in output and "add --conv_rank 4 to resume it" in output, output[
        -3000:
    ]


@pytest.mark.parametrize("fraction", [0.35, 0.8])
def test_a_run_killed_at_any_point_resumes_to_the_same_adapter(tiny, fraction):
    """Killed after a share of an uninterrupted run's time (during a step, a checkpoint or the final
    save), then resumed from whatever it left: the same adapter, and no half-written file under a
    final name."""
    reference = reference_run(tiny, "liera")
    output_dir = tiny["root"] / f"killed-{fraction}"
    args = train_args(tiny, output_dir, "liera", *VALIDATION)
    process = launch(args, SINGLE, start_new_session=True)
    time.sleep(fraction * _DURATION["liera"])
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    for checkpoint in output_dir.glob("checkpoint-*"):  # finished checkpoints are whole
        assert (checkpoint / "adapter.safetensors").is_file() and (checkpoint / "run.json").is_file()
    if (output_dir / "adapter.safetensors").exists():
        plugin.read_adapter_file(output_dir / "adapter.safetensors")  # whole, or not there at all
    run([*args, "--resume_from_checkpoint", "latest"])
    assert_same_adapter(output_dir, reference)
    assert json.loads((output_dir / "metrics.json").read_text())["steps"] == 4


PROCEDURES = {  # 6 steps, a restart at step 3: checkpoint-4 is in the middle of the second cycle
    "lora": ["--init", "pissa", "--relora_steps", "3", "--mpc", "orthogonal"],
    "flora": ["--init", "pissa", "--relora_steps", "3"],
    "hira": ["--relora_steps", "3", "--mpc", "diagonal"],
}


def procedure_run(tiny: dict[str, Path], method: str) -> Path:
    if f"procedures-{method}" not in _REFERENCE:
        output_dir = tiny["root"] / f"procedures-{method}"
        run(train_args(tiny, output_dir, method, "--max_train_steps", "6", *PROCEDURES[method]))
        _REFERENCE[f"procedures-{method}"] = output_dir
    return _REFERENCE[f"procedures-{method}"]


@pytest.mark.parametrize("method", list(PROCEDURES))
def test_procedures_save_a_plain_file_that_reproduces_the_trained_model(tiny, method):
    output_dir = procedure_run(tiny, method)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6
    # The script loads its own file on the base and compares it with the model it trained.
    assert metrics["saved_vs_trained_max_abs_diff"] < 1e-5
    tensors, header = plugin.read_adapter_file(output_dir / "adapter.safetensors")
    assert header["format"] == "liera/1"  # a plain adapter, readable by any liera/1 loader
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    if method == "lora":  # PiSSA's start, its negation, a restart (trained, next start's negation), trained
        assert tensors[f"{key}.lora_down"].shape[0] == 4 * 4
    assert (output_dir / "checkpoint-4" / "adapter_training_state.safetensors").is_file()
    difference = unet_output(tiny["base"], output_dir / "adapter.safetensors") - unet_output(tiny["base"])
    assert difference.abs().max() > 1e-6


def test_a_relora_run_resumed_in_the_middle_of_a_cycle_reaches_the_same_adapter(tiny):
    reference = procedure_run(tiny, "lora")
    output_dir = tiny["root"] / "procedures-resumed"
    output_dir.mkdir()
    shutil.copy(reference / "run.json", output_dir / "run.json")
    shutil.copytree(reference / "checkpoint-4", output_dir / "checkpoint-4")
    args = train_args(tiny, output_dir, "lora", "--max_train_steps", "6", *PROCEDURES["lora"])
    output = run([*args, "--resume_from_checkpoint", "latest"])
    assert "Resuming from checkpoint" in output
    assert_same_adapter(output_dir, reference)
    losses = json.loads((output_dir / "metrics.json").read_text())["losses"]
    assert losses == pytest.approx(json.loads((reference / "metrics.json").read_text())["losses"], abs=1e-5)


def test_procedures_are_refused_where_they_cannot_keep_the_file_plain(tiny, script, capsys):
    args = ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    assert "a sum of hadamard updates is not one" in refusal(
        script, capsys, [*args, "--adapter", "loha", "--relora_steps", "50"]
    )
    assert "--mpc: MPC constrains" in refusal(
        script, capsys, [*args, "--adapter", "diablo", "--mpc", "orthogonal"]
    )
    assert "the lie composition multiplies W" in refusal(
        script, capsys, [*args, "--adapter", "liera", "--init", "pissa"]
    )
    assert "--relora_warmup_steps needs --relora_steps" in refusal(
        script, capsys, [*args, "--relora_warmup_steps", "5"]
    )
    assert "--relora_steps must be a positive integer" in refusal(
        script, capsys, [*args, "--relora_steps", "0"]
    )


def test_arguments_carried_over_from_diffusers_script_work(tiny, script, capsys):
    """--pre_compute_text_embeddings (same adapter as encoding every step), --validation_epochs,
    --cache_dir, --push_to_hub (offline: the Hub layout, and how to upload it later)."""
    reference = reference_run(tiny, "lora")
    output_dir = tiny["root"] / "carried-over"
    output = run(
        train_args(
            tiny,
            output_dir,
            "lora",
            "--pre_compute_text_embeddings",
            "--validation_epochs",
            "1",
            "--num_validation_images",
            "1",
            "--validation_inference_steps",
            "2",
            "--cache_dir",
            str(tiny["root"] / "hf-cache"),
            "--push_to_hub",
            "--hub_model_id",
            "someone/tiny-subject",
        )  # fmt: skip
    )
    assert_same_adapter(output_dir, reference)
    # 3 images, batch 2: two batches an epoch, so 4 steps end the second epoch (the final grid, not an epoch one).
    assert [p.name for p in (output_dir / "validation").glob("epoch-*.png")] == ["epoch-0001.png"]
    assert (
        "offline (HF_HUB_OFFLINE), nothing uploaded" in output and "hf upload someone/tiny-subject" in output
    )
    card = (output_dir / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "- lora" in card

    args = ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    precomputed = [*args, "--pre_compute_text_embeddings"]
    assert "add --no-train_text_encoder_ti where it is a default" in refusal(script, capsys, precomputed)
    hira = [*precomputed, "--adapter", "hira"]  # the text encoder adapted by default
    assert "so the text encoder can't train: add --no-train_text_encoder\n" in refusal(script, capsys, hira)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes is not installed" in refusal(script, capsys, [*args, "--use_8bit_adam"])


def test_conv_learning_rate_gives_conv_adapters_a_group_of_their_own(script, capsys, tiny):
    from diffusers import UNet2DConditionModel

    from tests.conftest import TINY_UNET

    unet = UNet2DConditionModel(**TINY_UNET)
    plugin.add_adapter(unet, plugin.AdapterConfig(method="liera", rank=2), "default")
    trainable = [p for p in unet.parameters() if p.requires_grad]
    (everything,) = script.parameter_groups({"unet": unet}, 5e-3, None)
    assert everything["lr"] == 5e-3 and len(everything["params"]) == len(trainable)

    linear, conv = script.parameter_groups({"unet": unet}, 5e-3, 1e-3)
    assert (linear["lr"], conv["lr"]) == (5e-3, 1e-3)
    on_convs = {
        id(p)
        for layer in plugin.inject.adapted_layers(unet).values()
        if isinstance(layer.base_layer, torch.nn.Conv2d)
        for p in layer.adapters.parameters()
    }
    assert on_convs and {id(p) for p in conv["params"]} == on_convs
    assert len(linear["params"]) + len(conv["params"]) == len(trainable)

    pivotal = [
        "--pretrained_model_name_or_path",
        str(tiny["base"]),
        "--instance_data_dir",
        str(tiny["subject"]),
    ]
    args = [*pivotal, "--no-train_text_encoder_ti"]  # pivotal tuning's rates: PIVOTAL_LEARNING_RATES (above)
    divisor = script.DEFAULT_CONV_LEARNING_RATE_DIVISORS["liera"]
    assert script.parse_args(args).conv_learning_rate == script.DEFAULT_LEARNING_RATES["liera"] / divisor
    assert script.parse_args([*args, "--learning_rate", "1e-3"]).conv_learning_rate == 1e-3 / divisor
    # With pivotal tuning too, a given rate sets the convolutions' as without.
    assert script.parse_args([*pivotal, "--learning_rate", "1e-3"]).conv_learning_rate == 1e-3 / divisor
    other_targets = script.parse_args([*pivotal, "--targets", "attn+conv"])  # not the measured setting
    assert other_targets.learning_rate == script.DEFAULT_LEARNING_RATES["liera"]
    assert (
        script.parse_args([*pivotal, "--conv_learning_rate", "1e-4"]).learning_rate
        == script.PIVOTAL_LEARNING_RATES["liera"][0]
    )
    assert script.parse_args([*args, "--adapter", "lora"]).conv_learning_rate is None
    assert "--conv_learning_rate must be positive, got 0" in refusal(
        script, capsys, [*args, "--conv_learning_rate", "0"]
    )


def test_text_encoder_lr_gives_the_text_encoder_a_group_of_its_own(script, capsys, tiny):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.conftest import TINY_UNET

    unet = UNet2DConditionModel(**TINY_UNET)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    )
    for model in (unet, text_encoder):
        model.requires_grad_(False)
        plugin.add_adapter(model, plugin.AdapterConfig(method="liera", rank=2), "default")
    trained = {"unet": unet, "text_encoder": text_encoder}
    unet_linear, unet_conv, text = script.parameter_groups(trained, 5e-3, 1e-3, 2e-4)
    assert (unet_linear["lr"], unet_conv["lr"], text["lr"]) == (5e-3, 1e-3, 2e-4)
    in_text_encoder = {id(p) for p in text_encoder.parameters() if p.requires_grad}
    assert in_text_encoder and {id(p) for p in text["params"]} == in_text_encoder
    (everything,) = script.parameter_groups({"text_encoder": text_encoder}, 5e-3)
    assert {id(p) for p in everything["params"]} == in_text_encoder

    args = ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    assert script.parse_args([*args, "--no-train_text_encoder_ti"]).text_encoder_lr is None
    assert script.parse_args(args).text_encoder_lr == script.DEFAULT_TOKEN_LEARNING_RATE  # the new tokens'
    assert "--text_encoder_lr must be positive, got -1" in refusal(
        script, capsys, [*args, "--text_encoder_lr", "-1"]
    )
    assert "--prior_loss_weight must be a finite number >= 0, got nan" in refusal(
        script, capsys, [*args, "--prior_loss_weight", "nan"]
    )
    assert "--text_encoder_preservation keeps the adapted text encoder near the base" in refusal(
        script, capsys, [*args, "--text_encoder_preservation", "1", "--no-train_text_encoder"]
    )


def text_encoder_change(base: Path, adapter: Path, prompts: list[str]) -> float:
    """How far an adapter moves the text encoder's output for `prompts` from the base's."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        before = text_encoder(ids.input_ids)[0]
        tensors, metadata = plugin.read_adapter_file(adapter)
        mine = {key: value for key, value in tensors.items() if key.startswith("text_encoder.")}
        plugin.load_adapter((mine, metadata), {"text_encoder": text_encoder})
        return (text_encoder(ids.input_ids)[0] - before).norm().item()


def test_text_encoder_preservation_keeps_other_prompts_as_the_base_reads_them(tiny):
    """--text_encoder_preservation: the adapted text encoder keeps the empty prompt's and the class
    prompt's output nearer the base's than the same run without it, and the identifier still trains."""
    subject = tiny["root"] / "class-prompts"
    shutil.copytree(tiny["subject"], subject)
    prompts = json.loads((subject / "prompts.json").read_text())
    (subject / "prompts.json").write_text(
        json.dumps({**prompts, "class_prompts": ["a red circle", "a dotted circle"]})
    )
    changes = {}
    for weight in ("0", "100"):
        output_dir = tiny["root"] / f"te-preservation-{weight}"
        output = run(train_args(tiny, output_dir, "lora", "--instance_data_dir", str(subject), "--train_text_encoder",
                                "--max_train_steps", "8", "--text_encoder_preservation", weight))  # fmt: skip
        assert ("Text encoder preservation on 4 prompts, weight 100.0" in output) == (weight == "100")
        card = (output_dir / "README.md").read_text()
        assert ("prompts without the identifier kept (weight 100)" in card) == (weight == "100")
        adapter = output_dir / "adapter.safetensors"
        changes[weight] = [
            text_encoder_change(tiny["base"], adapter, p) for p in (["", "a circle"], ["a sks circle"])
        ]
    (kept_before, _), (kept, identifier) = changes["0"], changes["100"]
    assert kept < 0.5 * kept_before
    assert identifier > 0


def test_cache_latents_trains_the_same_adapter(tiny):
    """--cache_latents encodes each image (crop) once and samples its posterior with the run's own
    draws: the same adapter as encoding every step (to float rounding: one image at a time)."""
    reference = reference_run(tiny, "lora")
    output_dir = tiny["root"] / "cache-latents"
    output = run(train_args(tiny, output_dir, "lora", "--cache_latents"))
    # 3 instance and 2 class images of the resolution (one crop each); batches of 2, 1, 2, 1 (+ as many class).
    assert "--cache_latents: 5 image crops encoded once, for 12 uses" in output
    assert_same_adapter(output_dir, reference, atol=1e-4)


def test_pivotal_tuning_learns_new_tokens_that_resume_and_load_into_diffusers(tiny):
    """--train_text_encoder_ti: the identifier becomes <s0><s1> (embeddings.safetensors, textual
    inversion's format), the text encoder gets no adapter, checkpoints resume the embeddings, and the
    file the run loads back through diffusers reproduces the trained rows."""
    from plugin.pivotal import read_embeddings, save_embeddings

    ti = ["--train_text_encoder_ti", "--text_encoder_lr", "1e-2"]
    full = tiny["root"] / "pivotal"
    output = run(train_args(tiny, full, "lora", *ti))
    assert "Pivotal tuning: 'sks' learnt as <s0><s1> in text_encoder" in output
    tensors, tokens, word = read_embeddings(full / "embeddings.safetensors")
    assert tokens == ["<s0>", "<s1>"] and word == "sks" and tensors["emb_params"].shape == (2, 32)
    assert (full / "checkpoint-2" / "embeddings.safetensors").is_file()
    adapter_keys = load_file(full / "adapter.safetensors").keys()
    assert adapter_keys and not any(key.startswith("text_encoder.") for key in adapter_keys)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["saved_vs_trained_max_abs_diff"] == 0
    # Step 0 of the held-out curve is the base with the prompts as written for it ("sks").
    assert metrics["heldout_curve"][0][1] == pytest.approx(metrics["heldout_loss_before"], rel=1e-6)
    assert metrics["steady_steps_per_s"] > 0  # the last 2 of 4 steps
    card = (full / "README.md").read_text()
    assert "load_textual_inversion" in card and "<s0><s1>" in card
    run_file = json.loads((full / "run.json").read_text())
    assert run_file["instance_prompt"] == "a <s0><s1> circle"

    # Two steps, then resumed to four: the same embeddings and adapter as the run straight through.
    halves = tiny["root"] / "pivotal-halves"
    run(train_args(tiny, halves, "lora", *ti, "--max_train_steps", "2"))
    run(train_args(tiny, halves, "lora", *ti, "--resume_from_checkpoint", "latest"))
    resumed, _, _ = read_embeddings(halves / "embeddings.safetensors")
    torch.testing.assert_close(resumed["emb_params"], tensors["emb_params"], rtol=0, atol=1e-6)
    assert_same_adapter(halves, full)

    # `load_adapter` on a run's folder loads its tokens too; a second run's (the same token names) replaces
    # their rows; a damaged embeddings file refuses the whole load, leaving the pipeline as it was.
    from pipelines import LieraStableDiffusionPipeline

    pipe = LieraStableDiffusionPipeline.from_pretrained(tiny["base"], safety_checker=None)
    size = len(pipe.tokenizer)
    damaged = tiny["root"] / "pivotal-damaged"
    shutil.copytree(full, damaged)
    save_embeddings(damaged / "embeddings.safetensors", {"emb_params": torch.zeros(2, 7)}, tokens, word)
    with pytest.raises(plugin.AdapterFileError, match="emb_params has width 7, the text encoder's is 32"):
        pipe.load_adapter(damaged)
    assert len(pipe.tokenizer) == size and not any(pipe.get_list_adapters().values())
    ids = pipe.tokenizer.convert_tokens_to_ids  # of the tokens, once loaded
    embedding = pipe.text_encoder.get_input_embeddings
    pipe.load_adapter(full)
    assert len(pipe.tokenizer) == size + 2 and torch.equal(
        embedding().weight[ids(tokens)], tensors["emb_params"]
    )
    other = {"emb_params": tensors["emb_params"] + 1}
    save_embeddings(damaged / "embeddings.safetensors", other, tokens, word)
    pipe.load_adapter(damaged, adapter_name="other")
    assert len(pipe.get_list_adapters()["unet"]) == 2
    assert len(pipe.tokenizer) == size + 2 and torch.equal(
        embedding().weight[ids(tokens)], other["emb_params"]
    )


def test_pivotal_tuning_with_the_text_encoder_adapted_too(tiny):
    """Both at once, as diffusers' advanced script allows: the text encoder's adapter in the file, the
    identifier's rows in the embeddings file, and the two reproduce the trained model together."""
    output_dir = tiny["root"] / "pivotal-and-text-encoder"
    run(train_args(tiny, output_dir, "lora", "--train_text_encoder_ti", "--train_text_encoder"))
    keys = load_file(output_dir / "adapter.safetensors").keys()
    assert any(key.startswith("text_encoder.") for key in keys)
    assert (output_dir / "embeddings.safetensors").is_file()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["saved_vs_trained_max_abs_diff"] < 1e-5


def test_pivotal_tuning_refuses_what_it_cannot_do(tiny, script, capsys, tmp_path):
    args = train_args(tiny, tmp_path / "out", "lora", "--train_text_encoder_ti")
    assert "--token_abstraction 'zzz' is not in the instance prompt 'a sks circle'" in refusal(
        script, capsys, [*args, "--token_abstraction", "zzz"]
    )
    assert "--pre_compute_text_embeddings encodes the prompts once" in refusal(
        script, capsys, [*args, "--pre_compute_text_embeddings"]
    )
