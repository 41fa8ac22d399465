"""liera/1 files: round trips into fresh models, FORMAT.md read by hand, and refusals."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import plugin
from plugin import AdapterConfig, AdapterFileError
from plugin.layer import AdaptedLayer
from tests.conftest import TINY_UNET, randomize


def fresh_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


def trained_file(tmp_path, method="liera", **kwargs):
    unet = fresh_unet()
    plugin.add_adapter(unet, AdapterConfig(method=method, rank=4, base_model="tiny", **kwargs), "subject")
    randomize(unet)
    path = plugin.save_adapter(tmp_path / f"{method}.safetensors", {"unet": unet}, "subject")
    return unet, path


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "flora", "liera"])
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(tmp_path, method, unet_inputs):
    unet, path = trained_file(tmp_path, method)
    fresh = fresh_unet()
    name = plugin.load_adapter(path, {"unet": fresh})
    assert name == method and plugin.active_adapters(fresh) == [method]
    with torch.no_grad():
        assert torch.equal(unet(*unet_inputs).sample, fresh(*unet_inputs).sample)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic save left no temporary file


def test_a_conv_backend_of_its_own_saves_and_loads(tmp_path, unet_inputs):
    """lora on Linear layers with Tucker convs (LyCORIS' LoCon-Tucker): each module's backend is told by
    its own tensors, so the file loads as it was trained."""
    unet, path = trained_file(tmp_path, "lora", conv_backend="tucker", conv_rank=[4, 4, 2, 2])
    fresh = fresh_unet()
    plugin.load_adapter(path, {"unet": fresh})
    backends = {
        (module.base_layer.weight.ndim, module.adapters["lora"].backend.name)
        for module in fresh.modules()
        if isinstance(module, AdaptedLayer)
    }
    assert backends == {(2, "lowrank"), (4, "tucker")}
    with torch.no_grad():
        assert torch.equal(unet(*unet_inputs).sample, fresh(*unet_inputs).sample)


def test_header_and_keys_follow_format_md(tmp_path):
    unet, path = trained_file(tmp_path, "liera", lie_map="linear")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["format"] == "liera/1"
    assert metadata["composition"] == "lie" and metadata["lie_map"] == "linear"
    assert metadata["base_model"] == "tiny"
    assert json.loads(metadata["config"])["method"] == "liera"
    assert "unet.down_blocks.0.resnets.0.conv1.tucker_core" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down" in keys
    # Rebuild one adapted weight from the file alone, as FORMAT.md says anyone can.
    tensors = load_file(path)
    prefix = "unet.down_blocks.0.resnets.0.conv1"
    core = tensors[f"{prefix}.tucker_core"]
    factors = [tensors[f"{prefix}.tucker_factor.{i}"] for i in range(4)]
    delta = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors)
    base = fresh_unet().down_blocks[0].resnets[0].conv1.weight.detach()
    expected = base * (1 + tensors[f"{prefix}.scale"] * delta)
    layer = unet.down_blocks[0].resnets[0].conv1
    with torch.no_grad():
        torch.testing.assert_close(layer.adapted_weight([(layer.adapters["subject"], 1.0)]), expected)


def test_half_precision_files_load(tmp_path, unet_inputs):
    unet = fresh_unet()
    plugin.add_adapter(unet, AdapterConfig(method="flora", rank=4), "a")
    randomize(unet)
    path = plugin.save_adapter(tmp_path / "a.safetensors", {"unet": unet}, "a", dtype=torch.bfloat16)
    fresh = fresh_unet()
    plugin.load_adapter(path, {"unet": fresh})
    params = [p for n, p in fresh.named_parameters() if ".adapters." in n]
    assert params and all(p.dtype == torch.float32 for p in params)


def corrupt(path, tmp_path, edit_tensors=None, edit_metadata=None):
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=metadata)
    return bad


def wrong_shape(t):
    key = "unet.down_blocks.0.resnets.0.conv1.tucker_factor.1"
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def missing_module(t):
    t["unet.down_blocks.7.resnets.0.conv1.lora_down"] = torch.zeros(4, 9)


def nan_values(t):
    t["unet.up_blocks.1.resnets.0.conv2.tucker_core"][0, 0, 0, 0] = float("nan")


def missing_tensor(t):
    del t["unet.mid_block.resnets.0.conv1.scale"]


def stray_magnitude(t):
    t["unet.mid_block.resnets.0.conv1.magnitude"] = torch.ones(64)


def _drop_module(t, prefix):
    for key in [k for k in t if k.startswith(prefix + ".") and not k.endswith(".scale")]:
        del t[key]


def hadamard_in_liera_1(t):
    prefix = "unet.mid_block.resnets.0.conv1"
    _drop_module(t, prefix)
    for name, shape in {"w1_a": (64, 2), "w1_b": (2, 576), "w2_a": (64, 2), "w2_b": (2, 576)}.items():
        t[f"{prefix}.hada_{name}"] = torch.zeros(shape)


def two_backends(t):
    t["unet.mid_block.resnets.0.conv1.row"] = torch.zeros(64)


def integer_tensor(t):
    t["unet.mid_block.resnets.0.conv1.scale"] = torch.tensor(1)


@pytest.mark.parametrize(
    "edit_tensors, edit_metadata, message",
    [
        (
            wrong_shape,
            None,
            r"tucker_factor\.1 has shape \(33, 4\), but the module's weight \(32, 32, 3, 3\) needs \(32, 4\)",
        ),
        (missing_module, None, r"down_blocks\.7\.resnets\.0\.conv1\.\* names a module that unet has no"),
        (nan_values, None, r"up_blocks\.1\.resnets\.0\.conv2\.tucker_core' holds non-finite"),
        (missing_tensor, None, r"mid_block\.resnets\.0\.conv1\.scale must be a 0-d tensor, got missing"),
        (None, lambda m: m.update(format="liera/3"), r"unknown format 'liera/3'"),
        (None, lambda m: m.update(composition="multiplicative"), r"unknown composition 'multiplicative'"),
        (
            None,
            lambda m: m.update(composition="dora"),
            r"the 'dora' composition needs liera/2, but the header",
        ),
        (stray_magnitude, None, r"mid_block\.resnets\.0\.conv1\.magnitude is not a tensor of the 'lie'"),
        (
            hadamard_in_liera_1,
            None,
            r"mid_block\.resnets\.0\.conv1\.hada_w1_a is a 'hadamard' tensor, which needs liera/2",
        ),
        (two_backends, None, r"mid_block\.resnets\.0\.conv1 needs exactly one backend's tensors"),
        (integer_tensor, None, r"mid_block\.resnets\.0\.conv1\.scale' has dtype torch\.int64"),
    ],
)
def test_bad_files_are_refused_and_the_model_is_unchanged(
    tmp_path, edit_tensors, edit_metadata, message, unet_inputs
):
    _, path = trained_file(tmp_path, "liera")
    bad = corrupt(path, tmp_path, edit_tensors, edit_metadata)
    target = fresh_unet()
    plugin.add_adapter(target, AdapterConfig(method="lora", rank=2), "existing")
    randomize(target)
    before = snapshot(target)
    classes = [type(m) for m in target.modules()]
    with torch.no_grad():
        output = target(*unet_inputs).sample
    with pytest.raises(AdapterFileError, match=message):
        plugin.load_adapter(bad, {"unet": target})
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in target.modules()] == classes
    assert plugin.list_adapters(target) == ["existing"] and plugin.active_adapters(target) == ["existing"]
    with torch.no_grad():
        assert torch.equal(target(*unet_inputs).sample, output)


def test_a_file_for_another_base_or_not_safetensors_is_refused(tmp_path):
    _, path = trained_file(tmp_path, "lora")
    wider = dict(TINY_UNET, block_out_channels=(32, 48))
    with pytest.raises(AdapterFileError, match="has shape"):
        plugin.load_adapter(path, {"unet": UNet2DConditionModel(**wider)})
    pickle_like = tmp_path / "adapter.bin"
    pickle_like.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        plugin.load_adapter(pickle_like, {"unet": fresh_unet()})
    with pytest.raises(AdapterFileError, match="already has an adapter named 'lora'"):
        target = fresh_unet()
        plugin.load_adapter(path, {"unet": target})
        plugin.load_adapter(path, {"unet": target})


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    unet, path = trained_file(tmp_path, "lora")
    original = path.read_bytes()

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("plugin.files.save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        plugin.save_adapter(path, {"unet": unet}, "subject")
    assert path.read_bytes() == original
    assert not list(tmp_path.glob(".*.tmp"))
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, AdaptedLayer)


def huge_scale(t):
    t["unet.mid_block.resnets.0.conv1.scale"] = torch.tensor(1e6)


def test_finite_tensors_whose_adapted_weight_overflows_are_refused(tmp_path):
    _, path = trained_file(tmp_path, "liera")
    bad = corrupt(path, tmp_path, huge_scale)
    target = fresh_unet()
    before = snapshot(target)
    with pytest.raises(
        AdapterFileError, match=r"mid_block\.resnets\.0\.conv1 would get a non-finite adapted weight"
    ):
        plugin.load_adapter(bad, {"unet": target})
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert not plugin.list_adapters(target)
