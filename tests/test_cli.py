"""`python -m plugin inspect | export | merge` on tiny saved pipelines and real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from pipelines import LieraStableDiffusionPipeline
from plugin.cli import describe, main, parse_adapter
from plugin.layer import AdaptedLayer
from tests import tiny_pipes as tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    tiny.sd(tmp_path / "src").save_pretrained(folder)
    return folder


def test_inspect_shows_format_composition_modules_ranks_and_size(tmp_path):
    path = tiny.adapter_file(tmp_path / "subject.safetensors", tiny.sd(tmp_path), "liera")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "plugin", "inspect", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    for line in (
        "format       liera/1",
        "composition  lie",
        "lie map      exp",
        "method       liera",
        "base model   tiny",
    ):
        assert line in result.stdout
    info = describe(path)
    tensors = load_file(path)
    assert info["parameters"] == sum(t.numel() for k, t in tensors.items() if not k.endswith(".scale"))
    assert set(info["components"]) == {"unet", "text_encoder"}
    assert info["modules"] == sum(info["components"].values()) == sum(info["backends"].values())
    assert info["backends"].keys() == {"lowrank", "tucker"} and "lowrank r=4" in info["ranks"]


def test_export_writes_a_lora_that_diffusers_loads(tmp_path, base_dir, capsys):
    path = tiny.adapter_file(tmp_path / "style.safetensors", tiny.sd(tmp_path), "flora")
    assert main(["export", str(path), "--base", str(base_dir), "--rank", "64", "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "rel. error" in printed and "relative error mean" in printed
    out = tmp_path / "style_lora.safetensors"
    assert out.is_file()

    ours = LieraStableDiffusionPipeline.from_pretrained(base_dir)
    ours.set_progress_bar_config(disable=True)
    ours.load_adapter(path)
    reference = StableDiffusionPipeline.from_pretrained(base_dir)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(out))
    torch.testing.assert_close(tiny.generate(reference), tiny.generate(ours), atol=1e-4, rtol=0)

    info = describe(out)
    assert info["format"].startswith("LoRA") and info["export"]["max_relative_error"] < 1e-5
    assert main(["inspect", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == info["modules"]


def lycoris_load(unet, state):
    """LyCORIS' own loader (the one ComfyUI's matches) puts a kohya-keyed file on a diffusers UNet."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    try:
        network, _ = create_lycoris_from_weights(1.0, "", unet, weights_sd=dict(state))
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})
    network.apply_to()
    return network


@pytest.mark.parametrize(
    "method, layout, config",
    [
        ("loha", "loha", {}),
        ("dora", "dora", {}),
        ("flora", "locon", {}),
        ("lora", "locon", {"conv_backend": "tucker", "conv_rank": [4, 4, 2, 2]}),  # LoCon-Tucker itself
    ],
)
def test_exact_exports_load_in_the_tools_that_read_them(tmp_path, base_dir, capsys, method, layout, config):
    """LoHa and LoCon-with-Tucker keys through LyCORIS' loader; DoRA keys through diffusers'
    `load_lora_weights`."""
    components = ("unet",) if layout in ("loha", "locon") else ("unet", "text_encoder")
    maker = tiny.sd(tmp_path)
    path = tiny.adapter_file(
        tmp_path / f"{method}.safetensors", maker, method, components=components, **config
    )
    chosen = ["--format", "locon"] if layout == "locon" else []  # auto picks a LoRA diffusers reads
    assert main(["export", str(path), "--base", str(base_dir), "--dtype", "fp32", *chosen]) == 0
    assert f"{layout} export, exact" in capsys.readouterr().out
    out = tmp_path / f"{method}_{layout}.safetensors"
    ours = LieraStableDiffusionPipeline.from_pretrained(base_dir)
    ours.set_progress_bar_config(disable=True)
    ours.load_adapter(path)
    reference = StableDiffusionPipeline.from_pretrained(base_dir)
    reference.set_progress_bar_config(disable=True)
    base = tiny.generate(reference)
    if layout in ("loha", "locon"):
        state = load_file(out)
        network = lycoris_load(reference.unet, state)
        algo = "LohaModule" if layout == "loha" else "LoConModule"
        assert network.algo_table == {algo: len(network.loras)} and len(network.loras) > 10
        if layout == "locon":  # the convs keep their Tucker form: a mid, and 1x1 up and down
            mids = [key for key in state if key.endswith("lora_mid.weight")]
            assert mids and all(state[key.replace("lora_mid", "lora_up")].shape[2:] == (1, 1) for key in mids)
    else:
        reference.load_lora_weights(str(out))
    expected = tiny.generate(ours)
    torch.testing.assert_close(tiny.generate(reference), expected, atol=1e-4, rtol=0)
    assert (expected - base).abs().max() > 1e-2


def test_lossy_exports_say_so(tmp_path, base_dir, capsys):
    path = tiny.adapter_file(tmp_path / "s.safetensors", tiny.sd(tmp_path), "liera", components=("unet",))
    with pytest.raises(SystemExit, match="needs an SVD"):
        main(["export", str(path), "--base", str(base_dir)])
    assert main(["export", str(path), "--base", str(base_dir), "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert (
        "lora export, lossy (truncated SVD): it keeps" in printed
        and "relative error of W' - W mean" in printed
    )
    assert (
        main(
            [
                "export",
                str(path),
                "--base",
                str(base_dir),
                "--rank",
                "auto",
                "--out",
                str(tmp_path / "auto.safetensors"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    kept = float(printed.split("it keeps ")[1].split("%")[0])
    assert 99.0 <= kept < 100.0, printed  # the fewest ranks holding 99% of each module's update
    info = describe(tmp_path / "auto.safetensors")["export"]
    assert len(info["ranks"]) > 1 and info["share_kept"] == pytest.approx(kept / 100, abs=1e-4)
    with pytest.raises(SystemExit, match="export: .*a LoHa holds additive \\+ hadamard adapters exactly"):
        main(["export", str(path), "--base", str(base_dir), "--format", "loha"])


def test_merge_saves_a_plain_diffusers_pipeline_with_the_adapters_fused(tmp_path, base_dir):
    maker = tiny.sd(tmp_path)
    liera = tiny.adapter_file(tmp_path / "subject.safetensors", maker, "liera", seed=3)
    lora = tiny.adapter_file(tmp_path / "style.safetensors", maker, "lora", seed=4)
    out = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--adapter",
                f"{liera}:0.7",
                "--adapter",
                str(lora),
                "--out",
                str(out),
            ]
        )
        == 0
    )

    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    merged = DiffusionPipeline.from_pretrained(out)
    merged.set_progress_bar_config(disable=True)
    assert type(merged) is StableDiffusionPipeline
    assert not any(isinstance(m, AdaptedLayer) for m in merged.unet.modules())

    ours = LieraStableDiffusionPipeline.from_pretrained(base_dir)
    ours.set_progress_bar_config(disable=True)
    ours.load_adapter(liera)
    ours.load_adapter(lora)
    ours.set_adapters(["subject", "style"], [0.7, 1.0])
    unfused = tiny.generate(ours)
    ours.fuse_adapters()
    torch.testing.assert_close(tiny.generate(merged), tiny.generate(ours), atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.generate(merged), unfused, atol=1e-4, rtol=0)


def test_cli_errors_and_adapter_specs(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "no adapter file" in capsys.readouterr().err
    assert parse_adapter("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_adapter("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_adapter("C:\\runs\\a.safetensors") == ("C:\\runs\\a.safetensors", 1.0)


def test_cli_refuses_what_would_overwrite_or_make_no_sense(tmp_path, base_dir):
    path = tiny.adapter_file(tmp_path / "s.safetensors", tiny.sd(tmp_path), "lora", components=("unet",))
    before = path.read_bytes()
    for rank in ("0", "-1"):
        with pytest.raises(SystemExit, match="--rank must be a positive integer"):
            main(["export", str(path), "--base", str(base_dir), "--rank", rank])
    with pytest.raises(SystemExit, match="is the adapter itself"):
        main(["export", str(path), "--base", str(base_dir), "--out", str(path)])
    assert path.read_bytes() == before
    with pytest.raises(SystemExit, match="is the base pipeline"):
        main(["merge", "--base", str(base_dir), "--adapter", str(path), "--out", str(base_dir)])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        main(["merge", "--base", str(base_dir), "--adapter", str(path), "--out", str(taken)])
    assert (taken / "mine.txt").read_text() == "keep me"
    with pytest.raises(SystemExit, match="must be a finite number, got nan"):
        main(["merge", "--base", str(base_dir), "--adapter", f"{path}:nan", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    assert main(["merge", "--base", str(base_dir), "--adapter", str(path), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file() and not list(tmp_path.glob(".m.*"))


def test_export_finds_the_shipped_base_from_any_directory(tmp_path, monkeypatch, capsys):
    """The training script names the toy base repo-relative (`assets/toy-sd`) in the file."""
    pipe = LieraStableDiffusionPipeline.from_pretrained(ROOT / "assets" / "toy-sd")
    import plugin

    plugin.add_adapter(pipe.unet, plugin.AdapterConfig(method="lora", rank=2, targets=["to_q"]), "s")
    path = plugin.save_adapter(
        tmp_path / "s.safetensors", {"unet": pipe.unet}, "s", base_model="assets/toy-sd"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(path)]) == 0
    assert "lora export, exact" in capsys.readouterr().out
    assert os.stat(tmp_path / "s_lora.safetensors").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
