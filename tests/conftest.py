"""Shared small models: built from configs with random weights, nothing downloaded."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH_SCRIPT = ROOT / "train_scripts" / "train_dreambooth_liera.py"

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=8,
)


def sd15_unet_config() -> dict:
    config = json.loads((ROOT / "assets/configs/sd15_unet.json").read_text())
    config.pop("_class_name")
    return config


@pytest.fixture
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


@pytest.fixture
def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.tensor([10, 500]),
        torch.randn(2, 5, 32, generator=generator),
    )


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 2) -> None:
    """Give every adapter tensor non-zero values, so the adapters change outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.add_(std * torch.randn(param.shape, generator=generator).to(param))


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The DreamBooth script as a module, run from an empty directory: the default --output_dir is
    relative, and this checkout's own outputs/ (from `make train`) must not count as an earlier run."""
    spec = importlib.util.spec_from_file_location("train_dreambooth_liera", DREAMBOOTH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield module
    os.chdir(cwd)
