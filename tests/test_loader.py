"""The pipeline loader on real (tiny) diffusers pipelines: load, mix, weigh, fuse, unload, refuse."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import plugin
from pipelines import LieraStableDiffusionPipeline, LieraStableDiffusionXLPipeline, enable_liera
from plugin import AdapterFileError
from plugin.layer import AdaptedLayer
from plugin.loader import LieraLoaderMixin
from tests import tiny_pipes as tiny

SD_PARTS = ("unet", "text_encoder")
XL_PARTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture
def pipe(tmp_path):
    return tiny.sd(tmp_path, LieraStableDiffusionPipeline)


@pytest.fixture
def files(tmp_path):
    """One adapter file per method, trained-like, for the tiny SD pipeline (same seed, same base)."""
    maker = tiny.sd(tmp_path / "maker")
    return {
        method: tiny.adapter_file(tmp_path / f"{method}.safetensors", maker, method, seed=seed)
        for seed, method in enumerate(["liera", "lora", "flora"], start=3)
    }


def same_weights(pipe, weights) -> bool:
    now = weights_of(pipe)
    return now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())


def weights_of(pipe, parts=SD_PARTS):
    return {f"{c}.{k}": v.clone() for c in parts for k, v in getattr(pipe, c).state_dict().items()}


def classes_of(pipe, parts=SD_PARTS):
    return {f"{c}.{n}": type(m) for c in parts for n, m in getattr(pipe, c).named_modules()}


def effective_weights(pipe, parts=SD_PARTS):
    """The weight every adapted layer computes with right now (FORMAT.md's W')."""
    with torch.no_grad():
        return {
            f"{c}.{path}": layer.adapted_weight(layer.unfused_terms_active())
            for c in parts
            for path, layer in plugin.adapted_layers(getattr(pipe, c)).items()
        }


@pytest.mark.parametrize("method", ["liera", "lora", "flora"])
def test_from_pretrained_load_generate_and_weight_zero_is_the_base(tmp_path, files, method):
    tiny.sd(tmp_path / "src").save_pretrained(tmp_path / "base")
    pipe = LieraStableDiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    base = tiny.generate(pipe)

    name = pipe.load_adapter(files[method], weight=1.0)
    assert name == method and pipe.get_active_adapters() == [method]
    assert pipe.get_list_adapters() == {"unet": [method], "text_encoder": [method]}
    adapted = tiny.generate(pipe)
    assert (adapted - base).abs().max() > 1e-2

    pipe.set_adapters(method, 0.0)
    assert torch.equal(tiny.generate(pipe), base)
    pipe.set_adapters(method, 1.0)
    pipe.disable_adapters()
    assert torch.equal(tiny.generate(pipe), base) and pipe.get_active_adapters() == []
    pipe.enable_adapters()
    assert torch.equal(tiny.generate(pipe), adapted)
    # The runtime scale reaches the UNet (forward hook) and the text encoder (encode_prompt's lora_scale).
    assert torch.equal(tiny.generate(pipe, cross_attention_kwargs={"scale": 0.0}), base)
    assert torch.equal(tiny.generate(pipe), adapted)  # ... and is reset after the call


def test_an_existing_pipeline_gets_the_methods(tmp_path, files):
    plain = tiny.sd(tmp_path)
    base = tiny.generate(plain)
    pipe = enable_liera(plain)
    assert pipe is plain and type(pipe) is LieraStableDiffusionPipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.load_adapter(files["liera"])
    assert (tiny.generate(pipe) - base).abs().max() > 1e-2

    img2img = enable_liera(StableDiffusionImg2ImgPipeline(**tiny.sd(tmp_path).components))
    assert isinstance(img2img, LieraLoaderMixin) and isinstance(img2img, StableDiffusionImg2ImgPipeline)
    assert type(img2img).__name__ == "LieraStableDiffusionImg2ImgPipeline"
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = tiny.generate(img2img, image=image, strength=0.9)
    img2img.load_adapter(files["flora"])
    assert (tiny.generate(img2img, image=image, strength=0.9) - before).abs().max() > 1e-2
    with pytest.raises(TypeError, match="no unet, transformer or text encoder"):
        enable_liera(object())


def test_runtime_scale_equals_the_weight_for_additive_adapters(pipe, files):
    pipe.load_adapter(files["lora"])
    scaled = tiny.generate(pipe, cross_attention_kwargs={"scale": 0.5})
    pipe.set_adapters("lora", 0.5)
    assert torch.equal(tiny.generate(pipe), scaled)


def test_set_adapters_weights_are_linear_for_additive_adapters(pipe, files):
    base = {k: v for k, v in weights_of(pipe).items()}
    pipe.load_adapter(files["lora"])
    pipe.load_adapter(files["flora"])

    def delta(weights):
        pipe.set_adapters(["lora", "flora"], weights)
        return {k: w - base[f"{k}.weight"] for k, w in effective_weights(pipe).items()}

    lora, flora = delta([1.0, 0.0]), delta([0.0, 1.0])
    for weights in ([0.5, 0.0], [2.0, -1.0], [0.3, 0.7]):
        mixed = delta(weights)
        for key in mixed:
            expected = weights[0] * lora[key] + weights[1] * flora[key]
            torch.testing.assert_close(mixed[key], expected, atol=1e-6, rtol=1e-5)
    # Per-component weights, as diffusers' set_adapters takes them.
    pipe.set_adapters(["lora"], [{"unet": 1.0, "text_encoder": 0.0}])
    layers = {c: plugin.adapted_layers(getattr(pipe, c)) for c in SD_PARTS}
    assert all(layer.active == {"lora": 1.0} for layer in layers["unet"].values())
    assert all(layer.active == {"lora": 0.0} for layer in layers["text_encoder"].values())


def test_lie_and_additive_adapters_mix_by_format_md_in_any_load_order(tmp_path, files):
    from safetensors.torch import load_file

    latents = []
    for order in (["liera", "lora"], ["lora", "liera"]):
        pipe = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
        for method in order:
            pipe.load_adapter(files[method])
        pipe.set_adapters(order, [{"liera": 0.7, "lora": 1.3}[m] for m in order])
        latents.append(tiny.generate(pipe))
    torch.testing.assert_close(latents[0], latents[1], atol=1e-6, rtol=0)

    # One layer by hand from the files alone: W' = W ⊙ exp(m1 s1 D1) + m2 s2 D2.
    liera, lora = load_file(files["liera"]), load_file(files["lora"])
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    layer = pipe.unet.get_submodule(path)
    d1 = liera[f"unet.{path}.lora_up"] @ liera[f"unet.{path}.lora_down"]
    d2 = lora[f"unet.{path}.lora_up"] @ lora[f"unet.{path}.lora_down"]
    weight = layer.base_layer.weight
    expected = (
        weight * torch.exp(0.7 * liera[f"unet.{path}.scale"] * d1) + 1.3 * lora[f"unet.{path}.scale"] * d2
    )
    torch.testing.assert_close(effective_weights(pipe)[f"unet.{path}"], expected)


def test_fused_and_unfused_generation_agree_and_unfuse_restores(pipe, files):
    base_weights, base = weights_of(pipe), tiny.generate(pipe)
    for method in files:
        pipe.load_adapter(files[method])
    pipe.set_adapters(["liera", "lora", "flora"], [0.8, 0.5, 1.2])
    unfused = tiny.generate(pipe)
    assert (unfused - base).abs().max() > 1e-2
    pipe.fuse_adapters()
    fused = tiny.generate(pipe)
    torch.testing.assert_close(fused, unfused, atol=2e-5, rtol=0)
    # A fused pipeline with its adapters switched off computes the fused weights only.
    pipe.disable_adapters()
    torch.testing.assert_close(tiny.generate(pipe), fused, atol=2e-5, rtol=0)
    pipe.enable_adapters()

    pipe.unfuse_adapters()
    after = {k.replace(".base_layer", ""): v for k, v in weights_of(pipe).items() if ".adapters." not in k}
    worst = max((after[k] - v).abs().max().item() for k, v in base_weights.items())
    # Measured: 6e-8 (2 ulp; float32 rounding of exp(X)·exp(-X) and W + A - A). The latents (|x| ~ 8)
    # then move by ~2e-5 through two steps of a random network.
    assert worst < 1e-6
    torch.testing.assert_close(tiny.generate(pipe), unfused, atol=1e-4, rtol=0)

    # Fusing a subset leaves the rest running unfused; the sum is still the same pipeline.
    pipe.fuse_adapters(adapter_names=["liera"], components=["unet"])
    torch.testing.assert_close(tiny.generate(pipe), unfused, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no adapter named"):
        pipe.fuse_adapters(adapter_names=["nope"])


def test_unload_restores_the_original_modules(pipe, files):
    classes, weights, base = classes_of(pipe), weights_of(pipe), tiny.generate(pipe)
    pipe.load_adapter(files["liera"])
    pipe.load_adapter(files["lora"])
    assert isinstance(pipe.unet.down_blocks[0].resnets[0].conv1, AdaptedLayer)
    pipe.unload_adapters()
    assert classes_of(pipe) == classes
    assert same_weights(pipe, weights)
    assert pipe.get_list_adapters() == {} and not pipe.unet._forward_pre_hooks
    assert torch.equal(tiny.generate(pipe), base)


def test_delete_and_save_adapters(tmp_path, pipe, files):
    pipe.load_adapter(files["liera"])
    pipe.load_adapter(files["flora"])
    adapted = tiny.generate(pipe)
    path = pipe.save_adapter(tmp_path / "again.safetensors", "flora")
    pipe.delete_adapters("liera")
    assert pipe.get_list_adapters() == {"unet": ["flora"], "text_encoder": ["flora"]}
    with pytest.raises(ValueError, match="no adapter named"):
        pipe.delete_adapters("liera")
    fresh = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    fresh.load_adapter(path)
    assert torch.equal(tiny.generate(fresh), adapted)
    assert plugin.read_adapter_file(path)[1]["format"] == "liera/1"


def test_swapping_attention_processors_after_loading_keeps_the_adapters(pipe, files):
    base = tiny.generate(pipe)
    pipe.load_adapter(files["liera"])
    adapted = tiny.generate(pipe)
    for processor in (AttnProcessor(), AttnProcessor2_0()):
        pipe.unet.set_attn_processor(processor)
        # Float noise of another attention kernel (~2e-5 on |x| ~ 8), far below the adapter's effect.
        torch.testing.assert_close(tiny.generate(pipe), adapted, atol=1e-4, rtol=0)
    assert (adapted - base).abs().max() > 1e-2
    if torch.cuda.is_available():
        pytest.importorskip("xformers")
        pipe.to("cuda").enable_xformers_memory_efficient_attention()
        torch.testing.assert_close(tiny.generate(pipe).cpu(), adapted, atol=1e-3, rtol=0)


def test_a_file_for_another_base_is_refused_and_the_pipeline_is_unchanged(tmp_path, pipe, files):
    pipe.load_adapter(files["lora"])
    weights, classes, adapted = weights_of(pipe), classes_of(pipe), tiny.generate(pipe)

    other = tiny.sd(tmp_path / "other")
    other.unet = type(other.unet)(**dict(tiny.UNET, cross_attention_dim=32, block_out_channels=(32, 48)))
    wrong = tiny.adapter_file(tmp_path / "other.safetensors", other, "liera")
    with pytest.raises(AdapterFileError, match=r"other\.safetensors: key unet\..* has shape .* needs"):
        pipe.load_adapter(wrong)

    # Two components, the second one wrong: nothing is loaded into the first one either.
    good, _ = plugin.read_adapter_file(files["liera"])
    bad, metadata = plugin.read_adapter_file(files["liera"])
    key = next(k for k in bad if k.startswith("text_encoder.") and k.endswith("lora_down"))
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 1)
    with pytest.raises(AdapterFileError, match=r"has shape \(4, 33\), but the module's weight \(32, 32\)"):
        pipe.load_adapter((bad, metadata), adapter_name="mixed")
    with pytest.raises(AdapterFileError, match="already has an adapter named 'lora'"):
        pipe.load_adapter(files["lora"])
    with pytest.raises(AdapterFileError, match="pass metadata="):
        pipe.load_adapter(good)

    assert pipe.get_list_adapters() == {"unet": ["lora"], "text_encoder": ["lora"]}
    assert classes_of(pipe) == classes and same_weights(pipe, weights)
    assert torch.equal(tiny.generate(pipe), adapted)
    pipe.load_adapter(good, adapter_name="from_state_dict", metadata=metadata)  # the same tensors, all fine


def test_sdxl_two_text_encoders(tmp_path):
    maker = tiny.sdxl(tmp_path / "maker")
    path = tiny.adapter_file(tmp_path / "xl.safetensors", maker, "liera", components=XL_PARTS)
    pipe = tiny.sdxl(tmp_path, LieraStableDiffusionXLPipeline)
    base = tiny.generate(pipe)
    pipe.load_adapter(path, adapter_name="xl")
    assert sorted(pipe.get_list_adapters()) == sorted(XL_PARTS)
    adapted = tiny.generate(pipe)
    assert (adapted - base).abs().max() > 1e-2
    assert torch.equal(tiny.generate(pipe, cross_attention_kwargs={"scale": 0.0}), base)
    pipe.fuse_adapters()
    torch.testing.assert_close(tiny.generate(pipe), adapted, atol=2e-5, rtol=0)
    pipe.unfuse_adapters()
    saved = pipe.save_adapter(tmp_path / "saved.safetensors")
    components = {k.split(".")[0] for k in plugin.read_adapter_file(saved)[0]}
    assert components == set(XL_PARTS)
    pipe.unload_adapters()
    torch.testing.assert_close(tiny.generate(pipe), base, atol=1e-4, rtol=0)


def kohya_lora_on_attention(tmp_path) -> Path:
    """A diffusers-readable LoRA file on the attention layers (PEFT and we can't wrap the same layer)."""
    from plugin.export import lora_state_dict, save_lora

    attention_only = tiny.adapter_file(
        tmp_path / "attn.safetensors", tiny.sd(tmp_path), "lora", targets="attn"
    )
    exporter = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    exporter.load_adapter(attention_only, adapter_name="lora")
    state, report = lora_state_dict(exporter.liera_models(), "lora", rank=8, progress=False)
    return save_lora(tmp_path / "kohya.safetensors", state, report)


def test_diffusers_loras_and_ours_in_one_pipeline(tmp_path, pipe, files):
    """Our `set_adapters`/`get_*`/`delete_adapters` shadow diffusers' and still drive its PEFT LoRAs."""
    kohya_lora_on_attention(tmp_path)
    peft_only = tiny.sd(tmp_path)
    peft_only.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="peft")
    peft_latents = tiny.generate(peft_only)

    # Ours on the resnet convs only (PEFT and we can't wrap the same layer), PEFT on attention.
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="peft")
    tensors, metadata = plugin.read_adapter_file(files["flora"])
    convs = {k: v for k, v in tensors.items() if ".resnets." in k or "samplers" in k}
    pipe.load_adapter((convs, metadata), adapter_name="ours")
    assert pipe.get_list_adapters() == {"unet": ["ours", "peft"], "text_encoder": ["peft"]}
    pipe.set_adapters(["peft"])
    assert pipe.get_active_adapters() == ["peft"]
    torch.testing.assert_close(tiny.generate(pipe), peft_latents, atol=1e-5, rtol=0)
    pipe.set_adapters(["ours", "peft"], [1.0, 1.0])
    both = tiny.generate(pipe)
    assert (both - peft_latents).abs().max() > 1e-3
    pipe.delete_adapters(["peft"])
    assert pipe.get_list_adapters() == {"unet": ["ours"]}


def test_files_from_either_transformers_version_load(tmp_path, pipe, files):
    """transformers 4 named CLIPTextModel's layers `text_model.encoder...`; 5 names them `encoder...`."""
    pipe.load_adapter(files["liera"], adapter_name="now")
    expected = tiny.generate(pipe)
    pipe.unload_adapters()
    tensors, metadata = plugin.read_adapter_file(files["liera"])
    ours, theirs = "text_encoder.encoder.", "text_encoder.text_model.encoder."
    if hasattr(pipe.text_encoder, "text_model"):  # transformers 4
        ours, theirs = theirs, ours
    other = {k.replace(ours, theirs): v for k, v in tensors.items()}
    assert other.keys() != tensors.keys()
    pipe.load_adapter((other, metadata), adapter_name="other_version")
    assert torch.equal(tiny.generate(pipe), expected)


def test_diffusers_lora_method_names_act_on_ours_and_theirs(tmp_path, pipe, files):
    """A diffusers user's `fuse_lora`/`unfuse_lora`/`disable_lora`/`enable_lora`/`unload_lora_weights`
    act on our adapters too, with a PEFT LoRA loaded beside them (on other layers)."""
    base = tiny.generate(pipe)
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    text_weights = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    kohya_lora_on_attention(tmp_path)
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="peft")
    tensors, metadata = plugin.read_adapter_file(files["liera"])
    convs = {k: v for k, v in tensors.items() if ".resnets." in k or "samplers" in k}
    pipe.load_adapter((convs, metadata), adapter_name="ours")
    pipe.set_adapters(["ours", "peft"])
    both = tiny.generate(pipe)
    assert (both - base).abs().max() > 1e-3

    pipe.disable_lora()
    torch.testing.assert_close(tiny.generate(pipe), base, atol=1e-5, rtol=0)
    pipe.enable_lora()
    torch.testing.assert_close(tiny.generate(pipe), both, atol=1e-5, rtol=0)
    pipe.fuse_lora()
    layer = pipe.unet.down_blocks[0].resnets[0].conv1
    assert layer.fused == {"ours": 1.0}
    torch.testing.assert_close(tiny.generate(pipe), both, atol=1e-4, rtol=0)
    pipe.unfuse_lora()
    assert not layer.fused
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    for name, param in pipe.unet.named_parameters():
        if ".resnets." in name or "samplers" in name:  # ours: unfused bit for bit
            assert torch.equal(param, weights[name]), name
        else:  # PEFT's own unmerge subtracts its delta again: float rounding
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    for name, param in pipe.text_encoder.named_parameters():  # kohya's file adapts it too: PEFT's
        torch.testing.assert_close(param, text_weights[name], rtol=0, atol=1e-6)
    # PEFT's rounding (3e-8 in the text encoder) grows over 20 guided steps to ~1e-5 of outputs ~1.5
    torch.testing.assert_close(tiny.generate(pipe), base, atol=1e-5, rtol=1e-5)


def hub_cache(cache: Path, repo_id: str, files_by_name: dict[str, Path]) -> Path:
    """A Hugging Face cache holding `repo_id` at one revision, as `huggingface_hub` lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files_by_name.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return cache


def test_load_adapter_takes_what_load_lora_weights_takes(tmp_path, files):
    """A file, a folder with weight_name (and subfolder), a repo id from the offline hub cache, a
    state dict: the same adapter, the same images."""
    reference = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    reference.load_adapter(files["liera"], adapter_name="x")
    expected = tiny.generate(reference)
    folder = tmp_path / "shared" / "loras"
    folder.mkdir(parents=True)
    (folder / "subject.safetensors").write_bytes(files["liera"].read_bytes())
    cache = hub_cache(
        tmp_path / "hub", "someone/subject-liera", {"adapters/subject.safetensors": files["liera"]}
    )
    sources = [
        ((folder,), {"weight_name": "subject.safetensors"}),
        ((tmp_path / "shared",), {"subfolder": "loras", "weight_name": "subject.safetensors"}),
        (
            ("someone/subject-liera",),
            {"weight_name": "subject.safetensors", "subfolder": "adapters", "cache_dir": cache},
        ),
        ((plugin.read_adapter_file(files["liera"]),), {}),
    ]
    for args, kwargs in sources:
        pipe = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
        assert pipe.load_adapter(*args, adapter_name="x", **kwargs) == "x"
        assert torch.equal(tiny.generate(pipe), expected), kwargs
    pipe = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    with pytest.raises(FileNotFoundError, match=r"no adapter\.safetensors in .*loras.*subject\.safetensors"):
        pipe.load_adapter(folder)
    with pytest.raises(FileNotFoundError, match="'someone/other'.*cache"):
        pipe.load_adapter("someone/other", cache_dir=cache)
    assert pipe.get_list_adapters() == {}


def test_load_adapter_brings_a_hub_repos_token_embeddings_too(tmp_path, files):
    """A pivotal-tuning run pushed to the Hub: its `embeddings.safetensors` loads from beside the adapter,
    as from a run's folder; a repo without one loads the adapter alone."""
    from plugin.pivotal import save_embeddings

    pipe = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    size, width = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().embedding_dim
    rows = torch.randn(2, width)
    embeddings = save_embeddings(
        tmp_path / "embeddings.safetensors", {"emb_params": rows}, ["<s0>", "<s1>"], "sks"
    )
    cache = hub_cache(
        tmp_path / "hub",
        "someone/subject-pivotal",
        {"adapter.safetensors": files["liera"], "embeddings.safetensors": embeddings},
    )
    hub_cache(cache, "someone/subject-plain", {"adapter.safetensors": files["liera"]})
    pipe.load_adapter("someone/subject-plain", cache_dir=cache)
    assert len(pipe.tokenizer) == size
    pipe.load_adapter("someone/subject-pivotal", adapter_name="pivotal", cache_dir=cache)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert len(pipe.tokenizer) == size + 2
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], rows)


def test_hotswap_replaces_an_adapters_tensors_in_place(tmp_path, pipe):
    maker = tiny.sd(tmp_path / "maker")
    first, second = (tiny.adapter_file(tmp_path / f"{s}.safetensors", maker, "liera", seed=s) for s in (3, 9))
    pipe.load_adapter(first, adapter_name="subject")
    modules = dict(pipe.unet.named_modules())
    params = {name: p for name, p in pipe.unet.named_parameters()}
    pipe.load_adapter(second, adapter_name="subject", hotswap=True)
    # Nothing re-wrapped, no parameter replaced: a compiled graph still points at the same tensors.
    assert all(modules[name] is module for name, module in pipe.unet.named_modules())
    assert all(params[name] is p for name, p in pipe.unet.named_parameters())
    fresh = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    fresh.load_adapter(second, adapter_name="subject")
    assert torch.equal(tiny.generate(pipe), tiny.generate(fresh))

    other = tiny.adapter_file(tmp_path / "flora.safetensors", maker, "flora", seed=4)
    before = weights_of(pipe)
    with pytest.raises(
        AdapterFileError, match="additive \\+ tucker in the file, lie \\+ lowrank in the loaded"
    ):
        pipe.load_adapter(other, adapter_name="subject", hotswap=True)
    with pytest.raises(AdapterFileError, match="needs a loaded adapter named 'style'"):
        pipe.load_adapter(second, adapter_name="style", hotswap=True)
    assert same_weights(pipe, before)


@pytest.mark.parametrize("ours_first", [True, False])
def test_diffusers_loras_and_ours_on_the_same_layers_mix_in_either_order(tmp_path, files, ours_first):
    """A diffusers LoRA and ours on the same attention layers: each layer computes our `W' x`
    (FORMAT.md) plus diffusers' LoRA term, whichever was loaded first, and diffusers' method names
    weigh, fuse, unfuse and unload both."""
    kohya = kohya_lora_on_attention(tmp_path)
    # The reference, from operations tested alone: ours fused into plain layers, then diffusers' LoRA on top.
    reference = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    base = tiny.generate(reference)
    reference.load_adapter(files["liera"], adapter_name="ours")
    ours_only = tiny.generate(reference)
    reference.fuse_adapters()
    reference.unload_adapters()
    reference.load_lora_weights(str(kohya), adapter_name="peft")
    expected = tiny.generate(reference)

    pipe = tiny.sd(tmp_path, LieraStableDiffusionPipeline)
    weights = weights_of(pipe)
    loads = [lambda: pipe.load_adapter(files["liera"], adapter_name="ours"),
             lambda: pipe.load_lora_weights(str(kohya), adapter_name="peft")]  # fmt: skip
    for load in loads if ours_first else loads[::-1]:
        load()
    assert pipe.get_list_adapters() == {"unet": ["ours", "peft"], "text_encoder": ["ours", "peft"]}
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(to_q).__module__.startswith("peft.") and isinstance(to_q.base_layer, AdaptedLayer)
    pipe.set_adapters(["ours", "peft"])
    torch.testing.assert_close(tiny.generate(pipe), expected, atol=1e-4, rtol=0)
    pipe.set_adapters(["ours"])
    torch.testing.assert_close(tiny.generate(pipe), ours_only, atol=1e-5, rtol=0)
    pipe.set_adapters(["ours", "peft"])

    pipe.fuse_lora()
    torch.testing.assert_close(tiny.generate(pipe), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="diffusers' LoRAs are fused around our adapters"):
        pipe.unfuse_adapters()
    pipe.unfuse_lora()
    torch.testing.assert_close(tiny.generate(pipe), expected, atol=1e-4, rtol=0)
    pipe.disable_lora()
    torch.testing.assert_close(tiny.generate(pipe), base, atol=1e-5, rtol=0)
    pipe.enable_lora()
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    for key, value in weights_of(pipe).items():  # PEFT's unmerge subtracts its delta: float rounding
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny.generate(pipe), base, atol=1e-5, rtol=0)
