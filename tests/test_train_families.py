"""DreamBooth on SDXL, SD3 and Flux (plugin/families.py): real `accelerate launch` runs of the script on
tiny random pipelines, the saved file in a fresh process, and every preset on every family in process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import plugin
from plugin.families import FAMILIES, NoiseOptions, family_of, family_of_folder
from tests import tiny_pipes
from tests.conftest import randomize
from tests.dreambooth_fixtures import make_subject
from tests.test_train_dreambooth import SINGLE, refusal, run

RESOLUTION = 32
MAKERS = {"sdxl": tiny_pipes.sdxl, "sd3": tiny_pipes.sd3, "flux": tiny_pipes.flux}
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
LAUNCHED = {"sdxl": "liera", "sd3": "lora", "flux": "flora"}  # one preset per family through the script


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: more threads only wait on each other (and on whatever else the machine runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    folders = {"subject": make_subject(root / "subject"), "root": root}
    for name, make in MAKERS.items():
        make(root / f"tokenizers-{name}").save_pretrained(root / name)
        folders[name] = root / name
    return folders


def family_args(bases: dict[str, Path], family: str, output_dir: Path, method: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(bases[family]),
        "--instance_data_dir", str(bases["subject"]),
        "--output_dir", str(output_dir),
        "--adapter", method,
        "--rank", "4",
        "--resolution", str(RESOLUTION),
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--checkpointing_steps", "4",
        "--num_validation_images", "1",
        "--validation_inference_steps", "2",
        "--validation_steps", "2",
        "--num_drift_images", "2",
        "--num_class_images", "2",  # prior preservation (on by default) on generated class images
        "--prior_generation_steps", "2",
        *extra,
    ]  # fmt: skip


_RUNS: dict[str, Path] = {}


def family_run(bases: dict[str, Path], family: str) -> Path:
    """One 4-step run per family, text encoders adapted (pivotal tuning, SDXL's default for liera, has
    its own test), shared by the tests."""
    if family not in _RUNS:
        output_dir = bases["root"] / f"run-{family}"
        output = run(
            family_args(bases, family, output_dir, LAUNCHED[family], "--no-train_text_encoder_ti"), SINGLE
        )
        assert f"Base model: {FAMILIES[family].title}" in output
        _RUNS[family] = output_dir
    return _RUNS[family]


def liera_pipeline(family: str, base: Path):
    import diffusers

    from pipelines import enable_liera

    pipe = enable_liera(getattr(diffusers, PIPELINES[family]).from_pretrained(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_validation_image(pipe, family: str, prompt: str) -> torch.Tensor:
    """What the script's validation draws for `prompt` (seed 0, 2 steps, its sampling scheduler)."""
    pipe.scheduler = FAMILIES[family].sampling_scheduler(pipe)
    image = pipe(
        [prompt], num_inference_steps=2, generator=[torch.Generator().manual_seed(0)],
        **FAMILIES[family].generation_kwargs(RESOLUTION),
    ).images[0]  # fmt: skip
    return torch.from_numpy(np.array(image)).float()


@pytest.mark.parametrize("family", list(MAKERS))
def test_a_launched_run_trains_the_family_and_its_file_loads_in_a_fresh_process(bases, family):
    output_dir = family_run(bases, family)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and all(math.isfinite(loss) for loss in metrics["losses"])
    for name in ["train_images_loss", "heldout_loss", "class_loss"]:
        assert 0 < metrics[f"{name}_before"] < math.inf and 0 < metrics[f"{name}_after"] < math.inf, name
    assert metrics["train_images_loss_after"] != metrics["train_images_loss_before"]
    assert [step for step, _ in metrics["heldout_curve"]] == [0, 2, 4]
    assert metrics["saved_vs_trained_max_abs_diff"] < 1e-5
    assert len(list((output_dir / "class_images").glob("*.png"))) == 2
    for name in ["before", "step-000002", "final", "before_after"]:
        assert (output_dir / "validation" / f"{name}.png").is_file(), name
    card = (output_dir / "README.md").read_text()
    assert PIPELINES[family] in card or FAMILIES[family].liera_pipeline in card

    # The file names the family's denoiser and the text encoders diffusers' scripts train.
    tensors, header = plugin.read_adapter_file(output_dir / "adapter.safetensors")
    family_object = FAMILIES[family]
    components = {key.split(".")[0] for key in tensors}
    assert components == {family_object.denoiser, *family_object.trainable_text_encoders}
    assert json.loads(header["config"])["method"] == LAUNCHED[family]

    # This process is not the one that trained: load the file the plugin's way, draw what the script's
    # final validation drew (its pipeline had the same file loaded, and matched the trained models).
    pipe = liera_pipeline(family, bases[family])
    base = first_validation_image(pipe, family, "a sks circle")
    pipe.load_adapter(output_dir)
    adapted = first_validation_image(pipe, family, "a sks circle")
    grid = torch.from_numpy(np.array(Image.open(output_dir / "validation" / "final.png")))
    assert torch.equal(adapted, grid[:RESOLUTION].float())  # the first row: the first validation prompt
    assert not torch.equal(adapted, base)
    # Fused, the same images; unfused, the base weights come back.
    models = pipe.liera_models()
    before = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in models.items()}
    pipe.fuse_adapters()
    torch.testing.assert_close(
        first_validation_image(pipe, family, "a sks circle"), adapted, atol=1.0, rtol=0
    )
    pipe.unfuse_adapters()
    for name, model in models.items():
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[name][key], atol=1e-6, rtol=0, msg=f"{name}.{key}")
    pipe.unload_adapters()
    assert torch.equal(first_validation_image(pipe, family, "a sks circle"), base)


def test_sdxl_memory_options_train_float32_adapters(bases):
    """--gradient_checkpointing, --mixed_precision bf16, --cache_latents and --pre_compute_text_embeddings
    together on SDXL (bf16 autocast on the CPU)."""
    output_dir = bases["root"] / "sdxl-memory"
    run(family_args(bases, "sdxl", output_dir, "lora", "--gradient_checkpointing", "--mixed_precision", "bf16",
                    "--cache_latents", "--pre_compute_text_embeddings", "--no-train_text_encoder",
                    "--no-train_text_encoder_ti",
                    "--num_validation_images", "0"))  # fmt: skip
    with safe_open(str(output_dir / "adapter.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float32}
        assert {key.split(".")[0] for key in handle.keys()} == {"unet"}
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert all(math.isfinite(loss) for loss in metrics["losses"])
    assert metrics["train_images_loss_after"] != metrics["train_images_loss_before"]


# --- every preset on every family, in process ---------------------------------------------------


def train_in_process(
    pipe, scheduler, family: str, method: str, steps: int = 2, checkpointing: bool = False
) -> list[float]:
    """The script's training step, in this process: encode, noise, predict, weighted loss, AdamW."""
    from plugin.training import seeded_generator

    fam = FAMILIES[family]
    denoiser = getattr(pipe, fam.denoiser)
    config = plugin.AdapterConfig(method=method, rank=4)
    plugin.add_adapter(denoiser, config, "default")
    encoders = [getattr(pipe, name) for name in fam.text_encoders]
    trained = [denoiser]
    for name in fam.trainable_text_encoders:
        encoder = getattr(pipe, name)
        targets = fam.text_encoder_targets(name, encoder)  # as the script adapts them
        plugin.add_adapter(encoder, plugin.AdapterConfig(method=method, rank=4, targets=targets), "default")
        trained.append(encoder)
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    tokenizers = [getattr(pipe, name) for name in fam.tokenizers()]
    ids = torch.cat([fam.tokenize(tokenizers, prompt) for prompt in ["a sks circle", "a circle"]])
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = []
    for model in trained:
        model.train()
    for step in range(steps):
        generator = seeded_generator(1, 0, step)
        latents = fam.to_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.sample(generator=generator))
        noised = fam.noised(scheduler, latents, generator, NoiseOptions())
        conditioning = fam.encode(encoders, fam.split_ids(tokenizers, ids, None))
        conditioning.update(
            fam.extras(torch.tensor([[40, 32], [32, 32]]), torch.tensor([[4, 0], [0, 0]]), RESOLUTION, 3.5)
        )
        loss = fam.per_example_loss(
            fam.predict(denoiser, noised.noisy, noised.timesteps, conditioning), noised
        ).mean()
        loss.backward()
        # Every adapter reaches the loss (what data-parallel training needs), and some already move.
        assert all(p.grad is not None for p in params)
        assert any(p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    for model in trained:
        model.eval()
    return losses


def liera_pipeline_from(make, folder: Path):
    from pipelines import enable_liera

    return enable_liera(make(folder))


@pytest.mark.parametrize("method", ["liera", "flora", "lora"])
@pytest.mark.parametrize("family", list(MAKERS))
def test_every_preset_trains_on_every_family_and_its_file_reproduces_it(family, method, tmp_path):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    pipe = MAKERS[family](tmp_path)
    fam = FAMILIES[family]
    scheduler_class = FlowMatchEulerDiscreteScheduler if fam.flow_matching else DDPMScheduler
    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    losses = train_in_process(pipe, scheduler, family, method, checkpointing=family == "flux")
    assert all(math.isfinite(loss) for loss in losses)
    kwargs = {"max_sequence_length": 16} if fam.flow_matching else {}
    expected = tiny_pipes.generate(pipe, **kwargs)
    models = {name: getattr(pipe, name) for name in (fam.denoiser, *fam.trainable_text_encoders)}
    path = plugin.save_adapter(tmp_path / "adapter.safetensors", models, "default", base_model="tiny")
    fresh = liera_pipeline_from(MAKERS[family], tmp_path / "fresh")
    fresh.load_adapter(path)
    torch.testing.assert_close(tiny_pipes.generate(fresh, **kwargs), expected, atol=1e-5, rtol=0)
    fresh.unload_adapters()
    assert not torch.allclose(tiny_pipes.generate(fresh, **kwargs), expected, atol=1e-5, rtol=0)


# --- which family, and what each refuses ---------------------------------------------------------


def test_the_family_is_read_from_the_pipeline_configs(bases, script):
    for family in MAKERS:
        assert family_of_folder(bases[family]).name == family
        # A hub id's configs are read through diffusers' loaders (here from a folder, the same calls).
        assert script.hub_family(str(bases[family]), {"revision": None, "cache_dir": None}).name == family
    unet = {"_class_name": "UNet2DConditionModel"}
    assert family_of({"_class_name": "StableDiffusionPipeline"}, unet).name == "sd"
    assert family_of({}, {**unet, "addition_embed_type": "text_time"}).name == "sdxl"  # from the UNet alone
    with pytest.raises(ValueError, match="SDXL refiner"):
        family_of({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}, unet)
    with pytest.raises(ValueError, match="FluxKontextPipeline"):
        family_of({"_class_name": "FluxKontextPipeline"}, {"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match="PixArtTransformer2DModel"):
        family_of({"_class_name": "PixArtAlphaPipeline"}, {"_class_name": "PixArtTransformer2DModel"})


def test_arguments_a_family_cannot_use_are_refused_naming_it(bases, script, capsys, tmp_path):
    def args(family: str, *extra: str) -> list[str]:
        return ["--pretrained_model_name_or_path", str(bases[family]), "--instance_data_dir",
                str(bases["subject"]), "--output_dir", str(tmp_path / family), *extra]  # fmt: skip

    message = refusal(script, capsys, args("sd3", "--snr_gamma", "5"))
    assert (
        "--snr_gamma is for DDPM models" in message
        and "Stable Diffusion 3 trains with flow matching" in message
    )
    assert "Flux trains with flow matching" in refusal(script, capsys, args("flux", "--noise_offset", "0.1"))
    message = refusal(script, capsys, args("sdxl", "--weighting_scheme", "logit_normal"))
    assert "--weighting_scheme is for flow-matching models" in message and "Stable Diffusion XL" in message
    assert "Stable Diffusion 3 has none" in refusal(script, capsys, args("sd3", "--guidance_scale", "3"))
    # Defaults follow the family: SD3 logit_normal, Flux none and guidance 3.5.
    parsed = script.parse_args(args("sd3"))
    assert (parsed.family, parsed.weighting_scheme, parsed.guidance_scale) == ("sd3", "logit_normal", None)
    parsed = script.parse_args(args("flux"))
    assert (parsed.family, parsed.weighting_scheme, parsed.guidance_scale) == ("flux", "none", 3.5)
    assert script.parse_args(args("sdxl")).family == "sdxl"


def test_sdxl_time_ids_say_each_image_original_size_and_crop(tmp_path):
    """The dataset records (height, width) before resizing and the crop's (top, left); SDXL's time ids
    are those and the target size, as diffusers' SDXL script conditions on them."""
    from plugin.training import DreamBoothDataset, collate_fn

    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(image)
    pipe = tiny_pipes.sdxl(tmp_path)
    fam = FAMILIES["sdxl"]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    dataset = DreamBoothDataset([image], "a sks x", None, RESOLUTION,
                                tokenize=lambda p: fam.tokenize(tokenizers, p))  # fmt: skip
    crops = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        batch = collate_fn([dataset[0]])
        assert batch["original_sizes"].tolist() == [[40, 64]]
        top, left = batch["crop_top_lefts"][0].tolist()
        assert top == 0 and 0 <= left <= round(64 * RESOLUTION / 40) - RESOLUTION
        crops.add(left)
        time_ids = fam.extras(batch["original_sizes"], batch["crop_top_lefts"], RESOLUTION, 0.0)["time_ids"]
        assert time_ids.tolist() == [[40, 64, 0, left, RESOLUTION, RESOLUTION]]
    assert len(crops) > 1  # random crops move
    ids = batch["input_ids"]
    assert ids.shape == (1, 2 * pipe.tokenizer.model_max_length)  # both tokenizers' ids side by side


def test_the_generic_held_out_measure_gives_sd_the_numbers_it_always_had(tmp_path):
    """`plugin.families.denoising_loss` (SDXL, SD3, Flux) run on SD is `plugin.training.denoising_loss`:
    one measure, whatever the family; and a flow-matching family's measure moves with its adapter."""
    from plugin import families
    from plugin.training import denoising_loss, load_rgb

    pipe = tiny_pipes.sd(tmp_path)
    images = [load_rgb(path) for path in sorted(make_subject(tmp_path / "subject", heldout=0).glob("*.png"))]
    prompts = ["a sks circle", "a circle", "a sks circle"]
    models = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    generic = families.denoising_loss(FAMILIES["sd"], models, [pipe.tokenizer], pipe.scheduler, images, prompts,
                                      RESOLUTION, seed=3, num_timesteps=2)  # fmt: skip
    legacy = denoising_loss(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, images,
                            prompts, RESOLUTION, num_timesteps=2, seed=3)  # fmt: skip
    assert generic == legacy

    flux = tiny_pipes.flux(tmp_path / "flux")
    models = {"transformer": flux.transformer, "vae": flux.vae, "text_encoder": flux.text_encoder,
              "text_encoder_2": flux.text_encoder_2}  # fmt: skip
    tokenizers = [flux.tokenizer, flux.tokenizer_2]

    def loss() -> float:
        return FAMILIES["flux"].denoising_loss(models, tokenizers, flux.scheduler, images, prompts, RESOLUTION,
                                               num_timesteps=2)  # fmt: skip

    base = loss()
    assert base == loss() and math.isfinite(base)
    plugin.add_adapter(flux.transformer, plugin.AdapterConfig(method="lora", rank=4))
    randomize(flux.transformer, std=0.1)
    assert loss() != base


def test_two_cpu_processes_train_sdxl_to_identical_adapters(bases):
    """`accelerate launch` with two data-parallel processes (gloo on the CPU, as DDP on GPUs)."""
    from tests.test_train_dreambooth import CPU_2PROC

    output_dir = bases["root"] / "sdxl-two-processes"
    run(family_args(bases, "sdxl", output_dir, "lora", "--max_train_steps", "2", "--num_validation_images", "0",
                    "--num_drift_images", "0", "--no-with_prior_preservation", "--save_every_rank",
                    "--no-train_text_encoder_ti"),
        ["--config_file", str(CPU_2PROC)])  # fmt: skip
    rank0 = load_file(output_dir / "adapter_rank0.safetensors")
    rank1 = load_file(output_dir / "adapter_rank1.safetensors")
    assert rank0.keys() == rank1.keys() and {key.split(".")[0] for key in rank0} == {"unet", "text_encoder",
                                                                                   "text_encoder_2"}  # fmt: skip
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["max_abs_diff_between_ranks"] == 0


def test_sdxl_pivotal_tuning_saves_both_encoders_rows_as_sdxl_embeddings(bases):
    """--train_text_encoder_ti on SDXL: new tokens in both CLIPs, saved as `clip_l`/`clip_g` (the SDXL
    textual-inversion file), loaded back through diffusers to the trained rows; the card says how."""
    from plugin.pivotal import read_embeddings

    output_dir = bases["root"] / "sdxl-pivotal"
    output = run(family_args(bases, "sdxl", output_dir, "lora", "--train_text_encoder_ti",
                             "--num_validation_images", "0"))  # fmt: skip
    assert "learnt as <s0><s1> in text_encoder, text_encoder_2" in output
    tensors, tokens, word = read_embeddings(output_dir / "embeddings.safetensors")
    assert sorted(tensors) == ["clip_g", "clip_l"] and tokens == ["<s0>", "<s1>"] and word == "sks"
    assert all(t.shape[0] == 2 for t in tensors.values())
    with safe_open(str(output_dir / "adapter.safetensors"), framework="pt") as handle:
        assert {key.split(".")[0] for key in handle.keys()} == {"unet"}
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["saved_vs_trained_max_abs_diff"] == 0
    card = (output_dir / "README.md").read_text()
    assert (
        "`load_adapter` on this folder (or its Hub repo) loads them too" in card
        and "`clip_l` and `clip_g`" in card
    )
    # load_adapter on the run's folder puts each encoder's rows in place.
    from pipelines import LieraStableDiffusionXLPipeline

    pipe = LieraStableDiffusionXLPipeline.from_pretrained(bases["sdxl"])
    pipe.load_adapter(output_dir)
    for key, tokenizer, encoder in [
        ("clip_l", pipe.tokenizer, pipe.text_encoder),
        ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
    ]:
        rows = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)]
        assert torch.equal(rows, tensors[key])


def test_pivotal_tuning_is_refused_where_there_is_no_clip_to_learn_in(bases, script, capsys, tmp_path):
    argv = ["--pretrained_model_name_or_path", str(bases["flux"]), "--instance_data_dir", str(bases["subject"]),
            "--output_dir", str(tmp_path / "flux"), "--train_text_encoder_ti"]  # fmt: skip
    assert "--train_text_encoder_ti learns CLIP token embeddings (SD 1.x/2.x, SDXL); Flux" in refusal(
        script, capsys, argv
    )
