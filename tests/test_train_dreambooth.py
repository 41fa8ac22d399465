"""The DreamBooth script, run as users run it: `accelerate launch` in a subprocess, on a tiny random
pipeline. Short runs of each method, a killed-and-resumed run, a two-process run, bad arguments."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import plugin
from tests.dreambooth_fixtures import RESOLUTION, build_tiny_pipeline, make_subject

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_scripts" / "train_dreambooth_liera.py"
CPU_2PROC = ROOT / "train_scripts" / "accelerate_cpu_2proc.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SINGLE = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


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
        *extra,
    ]  # fmt: skip


def launch(script_args: list[str], launcher_args: list[str] = SINGLE, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, str(SCRIPT), *script_args]
    return subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def run(script_args: list[str], launcher_args: list[str] = SINGLE, timeout: float = 180) -> str:
    process = launch(script_args, launcher_args)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


_REFERENCE: dict[str, Path] = {}
# The liera runs also make validation grids (before, at step 2, final).
VALIDATION = ["--num_validation_images", "1", "--validation_inference_steps", "2", "--validation_steps", "2"]


def reference_run(tiny: dict[str, Path], method: str) -> Path:
    """One uninterrupted 4-step run per method, shared by the tests that need it."""
    if method not in _REFERENCE:
        output_dir = tiny["root"] / f"reference-{method}"
        run(train_args(tiny, output_dir, method, *(VALIDATION if method == "liera" else [])))
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


@pytest.mark.parametrize("method", ["liera", "flora", "lora"])
def test_short_run_writes_a_loadable_adapter_that_changes_the_model(tiny, method):
    output_dir = reference_run(tiny, method)
    adapter = output_dir / "adapter.safetensors"
    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "liera/1"
    assert json.loads(metadata["config"])["method"] == method
    assert metadata["base_model"] == str(tiny["base"])
    # Loadable into a fresh copy of the base, and trained: the adapter moved the model away from it.
    difference = (unet_output(tiny["base"], adapter) - unet_output(tiny["base"])).abs().max().item()
    assert difference > 1e-6
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4
    assert metrics["heldout_loss_before"] > 0 and metrics["heldout_loss_after"] > 0
    assert (output_dir / "README.md").is_file()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (output_dir / "checkpoint-2" / "adapter.safetensors").is_file()
    assert not list((output_dir / "checkpoint-2").glob("*model*"))  # no pickled model weights
    if method == "liera":
        for name in ["before", "final", "before_after", "step-000002"]:
            assert (output_dir / "validation" / f"{name}.png").is_file(), name


def test_a_killed_run_resumed_from_latest_reaches_the_same_adapter(tiny):
    reference = reference_run(tiny, "liera")
    output_dir = tiny["root"] / "killed"
    args = train_args(tiny, output_dir, "liera", *VALIDATION)
    process = launch(args, start_new_session=True)
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
    expected, resumed = (
        load_file(reference / "adapter.safetensors"),
        load_file(output_dir / "adapter.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)
    losses = json.loads((output_dir / "metrics.json").read_text())["losses"]
    assert losses == pytest.approx(json.loads((reference / "metrics.json").read_text())["losses"], abs=1e-5)


def test_two_cpu_processes_end_with_identical_adapters(tiny):
    output_dir = tiny["root"] / "two-processes"
    run([*train_args(tiny, output_dir), "--save_every_rank"], ["--config_file", str(CPU_2PROC)])
    rank0 = load_file(output_dir / "adapter_rank0.safetensors")
    rank1 = load_file(output_dir / "adapter_rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["max_abs_diff_between_ranks"] == 0


def test_instance_captions_give_each_image_its_own_prompt(tiny):
    """`--instance_captions`: a `<stem>.txt` beside an image wins over prompts.json's "captions"."""
    from transformers import CLIPTokenizer

    from plugin.training import DreamBoothDataset, tokenize_prompt

    subject = tiny["root"] / "captioned"
    shutil.copytree(tiny["subject"], subject)
    (subject / "subject_0.txt").write_text("a sks circle, from its text file\n")
    output = run(train_args(tiny, tiny["root"] / "captions", "liera", "--instance_data_dir", str(subject),
                            "--instance_captions"))  # fmt: skip
    assert "Prompts = per-image captions (3 distinct)" in output
    assert json.loads((tiny["root"] / "captions" / "metrics.json").read_text())["steps"] == 4

    tokenizer = CLIPTokenizer.from_pretrained(tiny["base"], subfolder="tokenizer")
    prompts = ["a sks circle, from its text file", "a sks circle on a blue background", "a sks circle"]
    images = sorted(subject.glob("*.png"))
    dataset = DreamBoothDataset(images, "unused", tokenizer, RESOLUTION, instance_prompts=prompts)
    for index, prompt in enumerate(prompts):
        assert torch.equal(dataset[index]["instance_prompt_ids"], tokenize_prompt(tokenizer, prompt)[0])


# --- bad arguments: refused while parsing, before torch and diffusers are even imported ---------


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_dreambooth_liera", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert "invalid choice: 'dora'" in refusal(script, capsys, [*base, *data, "--adapter", "dora"])
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
    message = refusal(script, capsys, [*base, *data, "--with_prior_preservation"])
    assert "--class_data_dir" in message
    assert "--conv_rank" in refusal(
        script, capsys, [*base, *data, "--adapter", "lora", "--conv_rank", "4", "4", "1", "1"]
    )
    message = refusal(
        script, capsys, [*base, *data, "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")]
    )
    assert "--resume_from_checkpoint: no checkpoint" in message
    message = refusal(script, capsys, [*data, "--pretrained_model_name_or_path", str(tmp_path / "no-model")])
    assert "--pretrained_model_name_or_path: no such directory" in message


def test_sdxl_is_refused_clearly(script, capsys, tiny, tmp_path):
    xl = tmp_path / "sdxl"
    (xl / "unet").mkdir(parents=True)
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (xl / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    message = refusal(
        script,
        capsys,
        ["--pretrained_model_name_or_path", str(xl), "--instance_data_dir", str(tiny["subject"])],
    )
    assert "Stable Diffusion XL" in message and "not supported" in message


def test_defaults_read_the_prompts_of_the_instance_folder(script, tiny):
    args = script.parse_args(
        ["--pretrained_model_name_or_path", str(tiny["base"]), "--instance_data_dir", str(tiny["subject"])]
    )
    assert args.instance_prompt == "a sks circle"
    assert args.validation_prompts == ["a sks circle", "a sks circle on a blue background"]
    assert args.output_dir == os.path.join("outputs", "dreambooth-liera")
    assert args.max_train_steps == script.DEFAULT_MAX_TRAIN_STEPS
    assert args.learning_rate == script.DEFAULT_LEARNING_RATES["liera"]


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
