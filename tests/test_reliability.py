"""Mistakes a user makes with the library API: refused by name, with nothing changed; or they work."""

import json
import random
import struct

import pytest
import torch

import plugin
from plugin import AdapterConfig, AdapterFileError
from plugin.layer import AdaptedLayer
from tests.conftest import randomize
from tests.test_compositions import Block


def adapted(method="liera", name="a"):
    torch.manual_seed(0)
    block = Block()
    plugin.add_adapter(block, AdapterConfig(method=method, rank=2, targets=["conv", "proj"]), name)
    randomize(block, std=0.2)
    return block


def weights(block):
    return {n: p.detach().clone() for n, p in block.named_parameters()}


def assert_unchanged(block, before):
    after = weights(block)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_name_with_a_dot_is_refused_before_anything_is_wrapped(tmp_path):
    block = Block()
    with pytest.raises(ValueError, match="adapter name 'subject.v1' must be a non-empty string without dots"):
        plugin.add_adapter(block, AdapterConfig(targets=["conv"]), "subject.v1")
    assert not any(isinstance(m, AdaptedLayer) for m in block.modules())
    assert all(p.requires_grad for p in block.parameters())  # nothing frozen either
    # A file called subject.v1.safetensors loads under the name subject_v1.
    source = adapted()
    path = plugin.save_adapter(tmp_path / "subject.v1.safetensors", {"unet": source}, "a")
    assert plugin.load_adapter(path, {"unet": Block()}) == "subject_v1"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "1.0", True])
def test_weights_and_scales_must_be_finite_numbers(bad, tmp_path):
    block = adapted()
    path = plugin.save_adapter(tmp_path / "a.safetensors", {"unet": block}, "a")
    before = weights(block)
    with pytest.raises(ValueError, match="must be a finite number"):
        plugin.set_adapters(block, ["a"], [bad])
    with pytest.raises(ValueError, match="must be a finite number"):
        plugin.fuse_adapters(block, scale=bad)
    with pytest.raises(ValueError, match="must be a finite number"):
        plugin.set_runtime_scale(block, bad)
    assert_unchanged(block, before)
    fresh = Block()
    fresh_before = weights(fresh)
    with pytest.raises(ValueError, match="must be a finite number"):
        plugin.load_adapter(path, {"unet": fresh}, weight=bad)
    assert_unchanged(fresh, fresh_before)
    assert not plugin.list_adapters(fresh)


def test_a_fuse_that_would_overflow_changes_no_layer():
    block = adapted("lora")
    plugin.add_adapter(block, AdapterConfig(method="liera", rank=2, targets=["proj"]), "huge")
    with torch.no_grad():
        block.proj.adapters["huge"].backend.lora_up.fill_(1e4)
        block.proj.adapters["huge"].backend.lora_down.fill_(1e4)
    plugin.set_adapters(block, ["a", "huge"])
    before = weights(block)
    with pytest.raises(ValueError, match="would make non-finite weights"):
        plugin.fuse_adapters(block)
    assert_unchanged(block, before)
    assert not block.conv.fused and not block.proj.fused


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.uint8])
def test_saving_in_a_dtype_format_md_does_not_allow_is_refused(dtype, tmp_path):
    block = adapted()
    with pytest.raises(ValueError, match="cannot save adapter tensors as torch"):
        plugin.save_adapter(tmp_path / "a.safetensors", {"unet": block}, "a", dtype=dtype)
    assert not list(tmp_path.iterdir())


def test_unload_gives_the_base_parameters_their_requires_grad_back():
    block = Block()
    block.conv.bias.requires_grad_(False)  # the user's own choice, kept
    plugin.add_adapter(block, AdapterConfig(targets=["proj"]), "a")
    assert not block.proj.base_layer.weight.requires_grad and not block.conv.weight.requires_grad
    plugin.unload_adapters(block)
    assert block.proj.weight.requires_grad and block.conv.weight.requires_grad
    assert not block.conv.bias.requires_grad


def test_moving_to_another_dtype_keeps_adapters_float32_and_drops_the_cached_weight():
    block = adapted()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        before = block(x)  # caches W' in float32
        block.to(torch.bfloat16)
        assert block.conv.base_layer.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for n, p in block.named_parameters() if ".adapters." in n)
        assert block.conv._weight_cache is None
        after = block(x.to(torch.bfloat16))
        assert after.dtype == torch.bfloat16
        torch.testing.assert_close(after.float(), before, rtol=0.05, atol=0.05)
        plugin.fuse_adapters(block)
        block.to(torch.float32)
        plugin.unfuse_adapters(block)
    assert block.conv.base_layer.weight.dtype == torch.float32


def test_pipeline_weights_for_unknown_components_are_refused(tmp_path):
    from tests import tiny_pipes as tiny

    maker = tiny.sd(tmp_path)
    path = tiny.adapter_file(tmp_path / "a.safetensors", maker, "lora")
    pipe = plugin.enable_liera(tiny.sd(tmp_path))
    pipe.load_adapter(path, adapter_name="a")
    with pytest.raises(ValueError, match=r"weights of adapter 'a' name unknown components \['unte'\]"):
        pipe.set_adapters(["a"], [{"unte": 0.5}])


def test_a_state_dict_without_its_header_is_refused():
    block = adapted()
    with pytest.raises(AdapterFileError, match="unknown format None"):
        plugin.load_adapter((plugin.adapter_state_dict(block, "a", "unet."), {}), {"unet": Block()})


def test_save_pretrained_with_live_adapters_is_refused_and_works_once_merged(tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests import tiny_pipes as tiny

    path = tiny.adapter_file(tmp_path / "a.safetensors", tiny.sd(tmp_path), "dora")
    pipe = plugin.enable_liera(tiny.sd(tmp_path))
    pipe.load_adapter(path)
    with pytest.raises(ValueError, match=r"holds adapters \{'unet': \['a'\], 'text_encoder': \['a'\]\}"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    expected = tiny.generate(pipe)
    pipe.fuse_adapters()
    pipe.unload_adapters()
    pipe.save_pretrained(tmp_path / "saved")
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    plain.set_progress_bar_config(disable=True)
    torch.testing.assert_close(tiny.generate(plain), expected, atol=1e-4, rtol=0)


# --- the loader against random corruptions of a valid file -------------------------------------------


def corruptions(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of a safetensors file: flipped bytes (header or data), a cut, or an edited
    header (dtype, shape, offsets, metadata)."""
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    kind = rng.choice(["flip_header", "flip_data", "cut", "dtype", "shape", "offsets", "metadata", "swap"])
    if kind == "flip_header" or kind == "flip_data":
        start, end = (0, 8 + header_len) if kind == "flip_header" else (8 + header_len, len(data))
        body = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        return bytes(body)
    if kind == "cut":
        return data[: rng.randrange(len(data))]
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    if kind == "dtype":
        header[key]["dtype"] = rng.choice(["F16", "BF16", "I64", "U8", "F64", "BOOL", "X9"])
    elif kind == "shape":
        shape = header[key]["shape"]
        if shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 7])
        else:
            header[key]["shape"] = [2]
    elif kind == "offsets":
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin, end + rng.choice([-4, 4, 4096])]
    elif kind == "metadata":
        field = rng.choice(["format", "composition", "lie_map", "config"])
        header["__metadata__"][field] = rng.choice(["liera/3", "dora", "sideways", "{", "", "linear"])
    else:  # swap two tensors' entries
        other = rng.choice(keys)
        header[key], header[other] = header[other], header[key]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + header_len :]


def test_random_corruptions_are_refused_by_name_or_loaded_exactly(tmp_path):
    source = adapted("liera")
    plugin.add_adapter(source, AdapterConfig(method="dora", rank=2, targets=["conv"]), "d")
    randomize(source, std=0.2)
    valid = plugin.save_adapter(tmp_path / "valid.safetensors", {"unet": source}, "a").read_bytes()
    rng = random.Random(0)
    refused = loaded = 0
    for trial in range(150):
        path = tmp_path / f"bad{trial}.safetensors"
        path.write_bytes(corruptions(valid, rng))
        target = Block()
        before = weights(target)
        try:
            plugin.load_adapter(path, {"unet": target}, "a")
        except AdapterFileError as error:
            assert str(path) in str(error), error
            assert_unchanged(target, before)
            assert not any(isinstance(m, AdaptedLayer) for m in target.modules())
            refused += 1
            continue
        tensors, _ = plugin.read_adapter_file(path)
        state = plugin.adapter_state_dict(target, "a", "unet.")
        assert state.keys() == tensors.keys()
        for key, tensor in tensors.items():
            assert torch.equal(state[key], tensor.float()), key
        loaded += 1
    assert refused > 100 and loaded > 0  # most corruptions break something; some (a flipped mantissa) don't


def test_a_save_cleans_up_what_a_killed_save_left(tmp_path):
    block = adapted()
    stale = tmp_path / ".a.safetensors.x1y2.tmp"
    stale.write_bytes(b"half a file")
    other = tmp_path / ".b.safetensors.x1y2.tmp"  # another file's: not ours to touch
    other.write_bytes(b"someone else's")
    plugin.save_adapter(tmp_path / "a.safetensors", {"unet": block}, "a")
    assert not stale.exists() and other.exists()
