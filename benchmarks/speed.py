#!/usr/bin/env python
"""What an adapter costs: ours (lora, flora, liera) side by side with PEFT LoRA and LyCORIS.

    python benchmarks/speed.py                     # SD 1.5 UNet, 32x32 latents on the CPU
    python benchmarks/speed.py --device cuda       # 64x64 latents on a GPU
    python benchmarks/speed.py --contenders peft-lora liera-tucker-exp --rounds 3
    python benchmarks/speed.py --device cuda --batch 4 --mixed_precision bf16 --name speed_cuda_bf16
    python benchmarks/speed.py --config assets/configs/sdxl_unet.json --device cuda --mixed_precision bf16 \
        --latent-size 128 --gradient-checkpointing --contenders peft-lora lora flora liera-tucker-exp \
        --name memory_sdxl_1024           # SDXL at 1024x1024, batch 1: what fits on a 24 GB GPU

Every contender adapts the same modules of a UNet built from `--config` with random weights (seed 0):
the attention projections and the resnet/sampler convolutions (this library's `attn+conv` preset,
passed by name to PEFT and LyCORIS). Each contender runs in its own fresh process, which measures:

- trainable parameters;
- training step: forward + backward + AdamW step on batch `--batch`, median of `--steps` steps after
  `--warmup`;
- peak memory of training, above the built model: on the CPU the peak resident size (VmHWM, what
  `getrusage().ru_maxrss` reports, reset through /proc/self/clear_refs after building the model) minus
  the resident size before the adapter is added; on a GPU `torch.cuda.max_memory_allocated` minus the
  allocation before the adapter;
- unfused and fused inference step (no grad), each timed alternately with an untouched copy of the base
  model in the same process, so the ratio to the base is robust to the machine's load;
- load + fuse of the saved adapter file (each library's own format), median of `--load-repeats`.

`--mixed_precision bf16|fp16` trains as diffusers' scripts and this project's script do: the base (and
the untouched copy timed beside it) in half precision, every library's adapter in float32, the forward
under `torch.autocast`. A UNet with SDXL's added conditioning (`addition_embed_type: text_time`) gets
random pooled text embeddings and time ids beside the context; `--gradient-checkpointing` recomputes
activations in the backward, as users fit SDXL in 24 GB.

On the CPU, times are the worker's CPU time by default (`--clock cpu`): on a machine shared with other
work, wall time mostly measures the wait for a core. Use `--threads 1` there as well.

`--rounds` repeats everything, rotating the contenders' order, and takes medians over rounds.
Results: `benchmarks/results/speed.{md,json,png}`, with date, machine, load and versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    environment,
    markdown_table,
    median,
    peak_rss_mib,
    pyplot,
    release_free_memory,
    reset_peak_rss,
    rss_mib,
    timed,
    write_json,
    write_markdown,
)

DEFAULT_CONFIG = REPO_ROOT / "assets" / "configs" / "sd15_unet.json"
REFERENCE = "peft-lora"
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
FLORA_CONV_RANK = [8, 8, 2, 2]
HALF_DTYPES = {"no": None, "bf16": "bfloat16", "fp16": "float16"}  # --mixed_precision -> torch dtype
PRECISION_WORDS = {
    "no": "float32",
    "bf16": "base in bfloat16, adapters in float32, autocast",
    "fp16": "base in float16, adapters in float32, autocast",
}

# name -> (library, options). Rank 8 everywhere (alpha = rank, so every scale is 1). `targets` (a preset
# of this library, default attn+conv) is what every library adapts: PEFT's GraLoRA takes Linear layers only.
CONTENDERS: dict[str, tuple[str, dict]] = {
    "peft-lora": ("peft", {"r": 8}),
    "peft-hira": ("peft", {"tuner": "hira", "r": 8}),
    "peft-dora": ("peft", {"tuner": "dora", "r": 8}),
    "peft-loha": ("peft", {"tuner": "loha", "r": 8}),
    "peft-gralora": ("peft", {"tuner": "gralora", "r": 8, "targets": "attn"}),
    "peft-ia3": ("peft", {"tuner": "ia3"}),
    "lycoris-locon-tucker": ("lycoris", {"algo": "locon", "use_tucker": True}),
    "lycoris-loha": ("lycoris", {"algo": "loha", "use_tucker": False}),
    "lycoris-dora": ("lycoris", {"algo": "locon", "use_tucker": False, "dora_wd": True}),
    "lora": ("ours", {"method": "lora", "rank": 8}),
    "flora": ("ours", {"method": "flora", "rank": 8, "conv_rank": FLORA_CONV_RANK}),
    "liera-lowrank-exp": ("ours", {"method": "liera", "backend": "lowrank", "rank": 8}),
    "liera-lowrank-linear": (
        "ours",
        {"method": "liera", "backend": "lowrank", "rank": 8, "lie_map": "linear"},
    ),
    "liera-tucker-exp": ("ours", {"method": "liera", "rank": 8, "conv_rank": FLORA_CONV_RANK}),
    "liera-tucker-linear": (
        "ours",
        {"method": "liera", "rank": 8, "conv_rank": FLORA_CONV_RANK, "lie_map": "linear"},
    ),
    "hira": ("ours", {"method": "hira", "rank": 8}),
    "abba": ("ours", {"method": "abba", "rank": 4}),
    "loha": ("ours", {"method": "loha", "rank": 8}),
    "bhra": ("ours", {"method": "bhra", "rank": 8}),
    "gralora": ("ours", {"method": "gralora", "rank": 8}),
    "gralora-attn": ("ours", {"method": "gralora", "rank": 8, "targets": "attn"}),
    "diablo": ("ours", {"method": "diablo"}),
    "ssb": ("ours", {"method": "ssb"}),
    "ssl": ("ours", {"method": "ssl"}),
    "ia3": ("ours", {"method": "ia3"}),
    "dora": ("ours", {"method": "dora", "rank": 8}),
    "dora-flora": ("ours", {"method": "dora-flora", "rank": 8, "conv_rank": FLORA_CONV_RANK}),
}
# Ours -> the other libraries' implementations of the same method, compared in their own table.
SAME_METHOD = {
    "hira": ["peft-hira"],
    "dora": ["peft-dora", "lycoris-dora"],
    "loha": ["peft-loha", "lycoris-loha"],
    "gralora-attn": ["peft-gralora"],
    "ia3": ["peft-ia3"],
    "flora": ["lycoris-locon-tucker"],
}
NOTES = {
    "peft-lora": "PEFT LoraConfig(r=8, lora_alpha=8) through diffusers' `unet.add_adapter`",
    "peft-hira": "PEFT HiraConfig(r=8), `inject_adapter_in_model`",
    "peft-dora": "PEFT LoraConfig(r=8, lora_alpha=8, use_dora=True)",
    "peft-loha": "PEFT LoHaConfig(r=8, alpha=8)",
    "peft-gralora": "PEFT GraloraConfig(r=8), attention projections only (PEFT's GraLoRA takes Linear layers only)",
    "peft-ia3": "PEFT IA3Config (output scaling on every target, no feed-forward modules)",
    "lycoris-locon-tucker": "LyCORIS LoCon dim 8, `use_tucker` (3x3 convs: 1x1 down, 3x3 core, 1x1 up)",
    "lycoris-loha": "LyCORIS LoHa dim 8 (Hadamard product of two rank-8 pairs)",
    "lycoris-dora": "LyCORIS LoCon dim 8 with `dora_wd` (DoRA's weight decomposition)",
    "lora": "ours: additive + lowrank, rank 8",
    "flora": f"ours: additive + tucker, rank 8, conv ranks {FLORA_CONV_RANK}",
    "liera-lowrank-exp": "ours: lie (exp) + lowrank rank 8 on every layer",
    "liera-lowrank-linear": "ours: lie (linear map) + lowrank rank 8 on every layer",
    "liera-tucker-exp": f"ours: lie (exp), tucker {FLORA_CONV_RANK} on convs, lowrank 8 on attention (the `liera` preset)",
    "liera-tucker-linear": f"ours: lie (linear map), tucker {FLORA_CONV_RANK} on convs, lowrank 8 on attention",
    "hira": "ours: `hira` preset, lie (linear) + lowrank rank 8",
    "abba": "ours: `abba` preset, additive + hadamard, rank 4 per pair (LoRA-8's parameter count, as ABBA's paper)",
    "loha": "ours: `loha` preset, additive + hadamard, rank 8 per pair (as LyCORIS and PEFT dim 8)",
    "bhra": "ours: `bhra` preset, lie (linear) + blocklowrank 2x2 blocks, rank 8",
    "gralora": "ours: `gralora` preset, additive + blocklowrank 2x2 blocks, rank 8",
    "gralora-attn": "ours: `gralora` on the attention projections only (PEFT's targets)",
    "diablo": "ours: `diablo` preset, additive + blockdiag, 64 blocks",
    "ssb": "ours: `ssb` preset, lie (exp) + rowcol, both vectors",
    "ssl": "ours: `ssl` preset, lie (linear) + rowcol, column vector",
    "ia3": "ours: `ia3` preset, lie (linear) + rowcol, row vector",
    "dora": "ours: `dora` preset, dora + lowrank rank 8",
    "dora-flora": f"ours: `dora-flora` preset, dora + tucker, rank 8, conv ranks {FLORA_CONV_RANK}",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="UNet2DConditionModel config JSON.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument("--latent-size", type=int, default=None, help="Default: 32 on the CPU, 64 on a GPU.")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--mixed_precision",
        choices=list(HALF_DTYPES),
        default="no",
        help="bf16/fp16: the base in that dtype, adapters in float32, forward under autocast.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads. Default: torch's default.")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="What a step's time is: wall time, or this process's CPU time (robust on a shared machine). "
        "Default: cpu on the CPU, wall on a GPU.",
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument(
        "--malloc-tuning",
        action="store_true",
        help=f"Run the workers with GLIBC_TUNABLES={GLIBC_TUNABLES}: glibc then keeps freed large blocks "
        "instead of unmapping them, so weight-sized temporaries are not page-faulted in again on every step.",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the adapted UNet and the base it is timed against (inductor; the warm-up steps "
        "absorb the compilation). Compare with a run without it for compiled vs eager.",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="Recompute the UNet's activations in backward."
    )
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before each measurement.")
    parser.add_argument("--steps", type=int, default=5, help="Timed training steps.")
    parser.add_argument("--infer-steps", type=int, default=5, help="Timed inference steps per mode.")
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="Repeat every contender, order rotated.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the workers' results of an interrupted run with the same settings (kept in --work-dir).",
    )
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "speed"), help="Partial results.")
    parser.add_argument("--name", default="speed", help="Stem of the results files.")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run every contender in this process (quick checks only: memory and timings then interact).",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    gpu = args.device.startswith("cuda")
    if args.latent_size is None:
        args.latent_size = 64 if gpu else 32
    if args.clock is None:
        args.clock = "wall" if gpu else "cpu"
    return args


# --- the contenders, behind one small interface -------------------------------------------------


class Contender:
    """Attach, save, fuse, unload, and load-and-fuse one library's adapter on a UNet."""

    def __init__(self, options: dict):
        self.options = options

    def attach(self, unet, targets: list[str]) -> int:
        """Add a fresh adapter on exactly `targets`; return the number of adapted modules."""
        raise NotImplementedError

    def trainable(self, unet) -> list:
        return [p for p in unet.parameters() if p.requires_grad]

    def save(self, unet, folder: Path) -> Path:
        raise NotImplementedError

    def fuse(self, unet) -> None:
        raise NotImplementedError

    def unload(self, unet) -> None:
        raise NotImplementedError

    def load_and_fuse(self, unet, path: Path, name: str) -> None:
        raise NotImplementedError


class Peft(Contender):
    def attach(self, unet, targets):
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        rank = self.options["r"]
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
        unet.add_adapter(config)
        return sum(isinstance(m, BaseTunerLayer) for m in unet.modules())

    def save(self, unet, folder):
        unet.save_lora_adapter(str(folder), weight_name="peft.safetensors")
        return folder / "peft.safetensors"

    def fuse(self, unet):
        unet.fuse_lora()

    def unload(self, unet):
        unet.unload_lora()

    def load_and_fuse(self, unet, path, name):
        unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None, adapter_name=name)
        unet.fuse_lora()


PEFT_CONFIGS = {  # tuner -> its PEFT config, given the rank and the target modules
    "hira": lambda r, targets: _peft().HiraConfig(r=r, target_modules=targets),
    "dora": lambda r, targets: _peft().LoraConfig(r=r, lora_alpha=r, use_dora=True, target_modules=targets),
    "loha": lambda r, targets: _peft().LoHaConfig(r=r, alpha=r, target_modules=targets),
    "gralora": lambda r, targets: _peft().GraloraConfig(r=r, target_modules=targets),
    "ia3": lambda r, targets: _peft().IA3Config(target_modules=targets, feedforward_modules=[]),
}


def _peft():
    import peft

    return peft


class PeftTuner(Contender):
    """Any PEFT tuner through PEFT's own functions (diffusers' helpers know LoRA only)."""

    def config(self, targets):
        return PEFT_CONFIGS[self.options["tuner"]](self.options.get("r", 8), targets)

    def attach(self, unet, targets):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.targets = targets
        _peft().inject_adapter_in_model(self.config(targets), unet, adapter_name="default")
        return sum(isinstance(m, BaseTunerLayer) for m in unet.modules())

    def save(self, unet, folder):
        from safetensors.torch import save_file

        path = folder / "peft.safetensors"
        state = _peft().get_peft_model_state_dict(unet, adapter_name="default")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    def fuse(self, unet):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()

    def unload(self, unet):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(unet.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.unmerge()
                parent, _, child = name.rpartition(".")
                setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())

    def load_and_fuse(self, unet, path, name):
        from safetensors.torch import load_file

        _peft().inject_adapter_in_model(self.config(self.targets), unet, adapter_name="default")
        _peft().set_peft_model_state_dict(unet, load_file(str(path)), adapter_name="default")
        self.fuse(unet)


class Lycoris(Contender):
    network = None

    def attach(self, unet, targets):
        from lycoris import LycorisNetwork

        # Exactly the named modules (regexes anchored at both ends), nothing selected by class.
        LycorisNetwork.apply_preset(
            {"target_module": [], "target_name": [rf"{re.escape(t)}$" for t in targets]}
        )
        self.network = LycorisNetwork(
            unet,
            multiplier=1.0,
            lora_dim=8,
            conv_lora_dim=8,
            alpha=8,
            conv_alpha=8,
            use_tucker=self.options["use_tucker"],
            network_module=self.options["algo"],
            **({"dora_wd": True} if self.options.get("dora_wd") else {}),
        )
        self.network.apply_to()
        self.network.to(_device_of(unet))  # LyCORIS builds its modules on the CPU
        return len(self.network.loras)

    def trainable(self, unet):
        return list(self.network.parameters())

    def save(self, unet, folder):
        path = folder / "lycoris.safetensors"
        self.network.save_weights(str(path), None, {})
        return path

    def fuse(self, unet):
        # Merge into the weights, then take LyCORIS' forward wrappers out, or they'd add the delta again.
        self.network.merge_to(1.0)
        self.network.restore()

    def unload(self, unet):
        self.network.restore()

    def load_and_fuse(self, unet, path, name):
        from lycoris import create_lycoris_from_weights

        self.network, _ = create_lycoris_from_weights(1.0, str(path), unet)
        self.network.to(_device_of(unet))
        self.network.merge_to(1.0)


class Ours(Contender):
    def attach(self, unet, targets):
        import plugin

        adapted = plugin.add_adapter(unet, plugin.AdapterConfig(**self.options), "default")
        if sorted(adapted) != sorted(targets):
            raise RuntimeError("the adapter's targets differ from the benchmark's")
        return len(adapted)

    def save(self, unet, folder):
        import plugin

        return plugin.save_adapter(folder / "ours.safetensors", {"unet": unet}, "default")

    def fuse(self, unet):
        import plugin

        plugin.fuse_adapters(unet)

    def unload(self, unet):
        import plugin

        plugin.unload_adapters(unet)

    def load_and_fuse(self, unet, path, name):
        import plugin

        plugin.load_adapter(path, {"unet": unet}, name)
        plugin.fuse_adapters(unet)


def _device_of(model):
    return next(model.parameters()).device


LIBRARIES: dict[str, type[Contender]] = {"peft": Peft, "lycoris": Lycoris, "ours": Ours}


def contender_for(library: str, options: dict) -> Contender:
    if library == "peft" and "tuner" in options:
        return PeftTuner(options)
    return LIBRARIES[library](options)


# --- one contender, in its own process ----------------------------------------------------------


def build_unet(config_path: str, device: str = "cpu"):
    """The UNet of `config_path` with random weights, initialised on `device` (an SDXL UNet's
    initialisation takes about a minute on the CPU, seconds on a GPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(Path(config_path).read_text())
    with torch.device(device):
        return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def added_conditioning(config, batch: int, generator) -> dict | None:
    """SDXL's added conditioning (pooled text embeddings and six time ids per image), random; None for
    a UNet without it."""
    import torch

    if config.addition_embed_type != "text_time":
        return None
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "text_embeds": torch.randn(batch, pooled, generator=generator),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1),
    }


def target_names(unet, preset: str = "attn+conv") -> list[str]:
    """The modules every contender adapts: this library's `attn+conv` preset (or another one)."""
    from plugin.config import AdapterConfig
    from plugin.inject import find_targets

    return list(find_targets(unet, AdapterConfig(targets=preset)))


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = args.device, args.device.startswith("cuda")
    library, options = CONTENDERS[args.worker]
    contender = contender_for(library, options)
    half = getattr(torch, HALF_DTYPES[args.mixed_precision]) if args.mixed_precision != "no" else None
    autocast = torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None)

    torch.manual_seed(0)
    unet = build_unet(args.config, device).to(device, dtype=half)
    unet.requires_grad_(False)
    reference = copy.deepcopy(unet).eval()  # the untouched base, timed alongside
    generator = torch.Generator().manual_seed(1)
    size, channels = args.latent_size, unet.config.in_channels
    latents = torch.randn(args.batch, channels, size, size, generator=generator).to(device, half)
    target = torch.randn(args.batch, unet.config.out_channels, size, size, generator=generator).to(device)
    context = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=generator)
    context = context.to(device, half)
    timesteps = torch.full((args.batch,), 500, device=device)
    added = added_conditioning(unet.config, args.batch, generator)
    if added is not None:
        added = {name: tensor.to(device, half) for name, tensor in added.items()}
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    targets = target_names(unet, options.get("targets", "attn+conv"))

    # Memory baseline: the built models, before the adapter exists.
    release_free_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = rss_mib()
        reset_peak_rss()

    modules = contender.attach(unet, targets)
    params = contender.trainable(unet)
    for param in params:  # trained in float32 under a half-precision base, as diffusers' scripts do
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model = torch.compile(unet) if args.compile else unet  # the adapters live in `unet` either way
    if args.compile:
        reference = torch.compile(reference)

    def train_step() -> None:
        with autocast:
            prediction = model(latents, timesteps, context, added_cond_kwargs=added, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    unet.train()
    train_times = [timed(train_step, device, args.clock) for _ in range(args.warmup + args.steps)][
        args.warmup :
    ]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()) - baseline
    unet.eval()

    clock = args.clock
    conditioning = {"added_cond_kwargs": added, "return_dict": False}

    def alternate(model) -> tuple[list[float], list[float]]:
        """Inference steps of `model` and of the base, one after the other."""
        ours, base = [], []
        with torch.no_grad(), autocast:
            for i in range(args.warmup + args.infer_steps):
                t_base = timed(lambda: reference(latents, timesteps, context, **conditioning), device, clock)
                t_model = timed(lambda: model(latents, timesteps, context, **conditioning), device, clock)
                if i >= args.warmup:
                    base.append(t_base)
                    ours.append(t_model)
        return ours, base

    unfused, base_unfused = alternate(model)
    with tempfile.TemporaryDirectory() as folder:
        path = contender.save(unet, Path(folder))
        file_mib = path.stat().st_size / 2**20
        contender.fuse(unet)
        fused, base_fused = alternate(model)
        load_times = []
        for repeat in range(args.load_repeats):
            contender.unload(unet)
            load_times.append(
                timed(lambda r=repeat: contender.load_and_fuse(unet, path, f"loaded{r}"), device, clock)
            )

    return {
        "contender": args.worker,
        "library": library,
        "options": options,
        "modules": modules,
        "params": sum(p.numel() for p in params),
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
        "base_dtype": str(unet.conv_in.weight.dtype),
        "gradient_checkpointing": unet.is_gradient_checkpointing,
        "train_step_s": median(train_times),
        "train_steps_s": train_times,
        "peak_mib": peak,
        "baseline_mib": baseline,
        "unfused_s": median(unfused),
        "base_unfused_s": median(base_unfused),
        "unfused_vs_base": median(unfused) / median(base_unfused),
        "fused_s": median(fused),
        "base_fused_s": median(base_fused),
        "fused_vs_base": median(fused) / median(base_fused),
        "base_infer_s": median(base_unfused + base_fused),
        "load_fuse_s": median(load_times),
        "load_fuse_all_s": load_times,
        "file_mib": file_mib,
        "torch_threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "loadavg": list(os.getloadavg()),
    }


# What a worker's numbers depend on: runs with other values are never mixed by --resume.
MEASUREMENT_SETTINGS = (
    "config", "device", "mixed_precision", "gradient_checkpointing", "latent_size", "batch", "threads", "clock", "malloc_tuning", "warmup", "steps",
    "infer_steps", "load_repeats", "compile",
)  # fmt: skip


def partial_results(args: argparse.Namespace) -> dict:
    """Workers' results saved so far by a run with the same settings (with --resume), else none."""
    settings = {key: getattr(args, key) for key in MEASUREMENT_SETTINGS}
    path = Path(args.work_dir) / f"{args.name}.partial.json"
    results = {}
    if args.resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            results = saved["results"]
    return {"path": path, "settings": settings, "results": results}


def spawn_worker(args: argparse.Namespace, name: str, argv: list[str]) -> dict | None:
    """Run one contender in a fresh interpreter and read back its numbers (None if it failed)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
            "--worker",
            name,
            "--worker-out",
            str(out),
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if args.malloc_tuning:
            env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        code = subprocess.run(command, env=env, cwd=REPO_ROOT).returncode
        if code != 0:  # e.g. -9: killed for memory. The other contenders still run.
            print(f"{name}: the worker failed (exit code {code})", file=sys.stderr)
            return None
        return json.loads(out.read_text())


# --- tables and plot ----------------------------------------------------------------------------

SCALARS = (
    "params",
    "modules",
    "train_step_s",
    "peak_mib",
    "baseline_mib",
    "unfused_s",
    "fused_s",
    "base_infer_s",
    "unfused_vs_base",
    "fused_vs_base",
    "load_fuse_s",
    "file_mib",
)
# goal name -> (contenders it applies to, metric, limit)
CLOCK_WORDS = {
    "wall": "wall-clock time",
    "cpu": "the worker process's CPU time (`time.process_time`, robust to other work on the machine)",
}
FUSED_TOLERANCE = 1.05  # "equal to the base": within 5%, the timing noise of a shared machine


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median over rounds of every scalar, plus ratios to PEFT LoRA."""
    summary = {
        name: {key: median([r[key] for r in results]) for key in SCALARS} for name, results in runs.items()
    }
    reference = summary.get(REFERENCE)
    for row in summary.values():
        for key in ("params", "train_step_s", "peak_mib", "load_fuse_s"):
            row[f"{key}_vs_peft"] = row[key] / reference[key] if reference else float("nan")
    return summary


def goals(summary: dict[str, dict]) -> list[dict]:
    """The issue's targets, each checked on the contenders it names."""
    ours = [name for name in summary if CONTENDERS[name][0] == "ours"]
    checks = []

    def check(goal: str, name: str, value: float, limit: float) -> None:
        checks.append(
            {"goal": goal, "contender": name, "value": value, "limit": limit, "met": value <= limit}
        )

    if REFERENCE in summary:
        if "flora" in summary:
            check("flora training step <= PEFT LoRA", "flora", summary["flora"]["train_step_s_vs_peft"], 1.0)
            check("flora parameters <= PEFT LoRA", "flora", summary["flora"]["params_vs_peft"], 1.0)
        for name in ours:
            if name.startswith("liera"):
                check(
                    "liera training step <= 1.25x PEFT LoRA",
                    name,
                    summary[name]["train_step_s_vs_peft"],
                    1.25,
                )
        for name in ours:
            check("training peak memory <= 1.1x PEFT LoRA", name, summary[name]["peak_mib_vs_peft"], 1.1)
    for name in ours:
        check(
            f"fused inference = base (<= {FUSED_TOLERANCE}x)",
            name,
            summary[name]["fused_vs_base"],
            FUSED_TOLERANCE,
        )
    for name in ours:
        check("unfused inference <= 1.15x base", name, summary[name]["unfused_vs_base"], 1.15)
    return checks


def tables(
    summary: dict[str, dict], checks: list[dict], args: argparse.Namespace, failed: dict[str, int]
) -> str:
    headers = [
        "contender",
        "params",
        "params ×PEFT",
        "train step (s)",
        "train ×PEFT",
        "peak mem (MiB)",
        "peak ×PEFT",
        "unfused (s)",
        "unfused ×base",
        "fused (s)",
        "fused ×base",
        "load+fuse (s)",
        "load+fuse ×PEFT",
    ]
    rows = [
        [
            f"`{name}`",
            f"{row['params']:,.0f}",
            f"{row['params_vs_peft']:.2f}",
            f"{row['train_step_s']:.3f}",
            f"**{row['train_step_s_vs_peft']:.2f}**",
            f"{row['peak_mib']:.0f}",
            f"**{row['peak_mib_vs_peft']:.2f}**",
            f"{row['unfused_s']:.3f}",
            f"**{row['unfused_vs_base']:.2f}**",
            f"{row['fused_s']:.3f}",
            f"**{row['fused_vs_base']:.2f}**",
            f"{row['load_fuse_s']:.2f}",
            f"{row['load_fuse_s_vs_peft']:.2f}",
        ]
        for name, row in summary.items()
    ]
    base = median([row["base_infer_s"] for row in summary.values()])
    modules = sorted({int(row["modules"]) for row in summary.values()})
    goal_rows = [
        [
            c["goal"],
            f"`{c['contender']}`",
            f"{c['value']:.2f}",
            f"{c['limit']:.2f}",
            "yes" if c["met"] else "**no**",
        ]
        for c in checks
    ]
    same_rows = [
        [
            f"`{ours}`",
            f"`{theirs}`",
            f"{summary[ours]['params'] / summary[theirs]['params']:.2f}",
            f"**{summary[ours]['train_step_s'] / summary[theirs]['train_step_s']:.2f}**",
            f"**{summary[ours]['peak_mib'] / summary[theirs]['peak_mib']:.2f}**",
            f"{summary[ours]['unfused_s'] / summary[theirs]['unfused_s']:.2f}",
        ]
        for ours, others in SAME_METHOD.items()
        for theirs in others
        if ours in summary and theirs in summary
    ]
    notes = "\n".join(f"- `{name}`: {NOTES[name]}" for name in summary)
    if failed:
        notes += "\n\nFailed (worker exited with an error, e.g. killed for memory): " + ", ".join(
            f"`{name}` ({count}x)" for name, count in failed.items()
        )
    return "\n\n".join(
        [
            f"UNet `{Path(args.config).name}` (random weights), batch {args.batch}, {args.latent_size}x{args.latent_size} "
            f"latents, {args.device}, {PRECISION_WORDS[args.mixed_precision]}"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; {', '.join(map(str, modules))} adapted modules per contender (attention projections and resnet/"
            f"sampler convolutions). Medians of {args.steps} training / {args.infer_steps} inference steps after "
            f"{args.warmup} warm-up, {args.rounds} round(s); times are {CLOCK_WORDS[args.clock]}; glibc malloc "
            f"{'tuned (`GLIBC_TUNABLES=' + GLIBC_TUNABLES + '`)' if args.malloc_tuning else 'at its defaults'}. Base model "
            f"inference step: {base:.3f} s.",
            "## Cost, as ratios (×PEFT: to PEFT LoRA r=8; ×base: to the plain UNet, timed alternately in the same process)",
            markdown_table(headers, rows),
            "Peak memory: training's peak above the built model (CPU: peak resident size, VmHWM, reset after "
            "building the model, minus the resident size before the adapter; GPU: `max_memory_allocated`).",
            "## Same method, other libraries (ours ÷ theirs: below 1 is ours cheaper)",
            markdown_table(
                ["ours", "theirs", "params", "train step", "peak memory", "unfused inference"],
                same_rows,
                "llrrrr",
            )
            if same_rows
            else "(no pairs in this run)",
            "## Goals",
            markdown_table(["goal", "contender", "measured", "limit", "met"], goal_rows, "llrrl"),
            "## Contenders",
            notes,
        ]
    )


def plot(summary: dict[str, dict], path: Path) -> Path:
    plt = pyplot()
    names = list(summary)
    panels = [
        ("train step ×PEFT", "train_step_s_vs_peft", [1.0, 1.25]),
        ("training peak memory ×PEFT", "peak_mib_vs_peft", [1.1]),
        ("unfused inference ×base", "unfused_vs_base", [1.15]),
        ("fused inference ×base", "fused_vs_base", [1.0]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.45 * len(names) + 1.6), sharey=True)
    colors = {"peft": "tab:gray", "lycoris": "tab:orange", "ours": "tab:blue"}
    for ax, (title, key, lines) in zip(axes, panels):
        values = [summary[n][key] for n in names]
        ax.barh(names, values, color=[colors[CONTENDERS[n][0]] for n in names])
        for limit in lines:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max([*values, *lines]) * 1.25)
    axes[0].invert_yaxis()
    fig.suptitle("Adapter cost on the SD 1.5 UNet (dashed: goals)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- driver -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return result

    from tqdm import tqdm

    env = environment(args.device, args.threads)
    loads = [env["loadavg"][0]]
    runs: dict[str, list[dict]] = {name: [] for name in args.contenders}
    failed: dict[str, int] = {}  # contender -> workers that died (e.g. killed for memory)
    order = list(args.contenders)
    jobs = [(r, order[r % len(order) :] + order[: r % len(order)]) for r in range(args.rounds)]
    partial = partial_results(args)
    with tqdm(total=args.rounds * len(order), desc="speed") as progress:
        for round_index, names in jobs:
            for name in names:
                progress.set_postfix_str(name)
                key = f"{name}/{round_index}"
                if key in partial["results"]:
                    result = partial["results"][key]
                elif args.in_process:
                    result = run_worker(argparse.Namespace(**{**vars(args), "worker": name}))
                else:
                    result = spawn_worker(args, name, argv)
                    if result is not None:
                        partial["results"][key] = result
                        write_json(
                            partial["path"], {"settings": partial["settings"], "results": partial["results"]}
                        )
                if result is None:
                    failed[name] = failed.get(name, 0) + 1
                else:
                    runs[name].append(result)
                    loads.append(result["loadavg"][0])
                progress.update()
    runs = {name: results for name, results in runs.items() if results}
    if not runs:
        raise SystemExit("every contender failed")
    first = next(iter(runs.values()))[0]
    env["torch_threads"] = first["torch_threads"]
    env["loadavg_range"] = [round(min(loads), 2), round(max(loads), 2)]

    summary = summarise(runs)
    checks = goals(summary)
    body = tables(summary, checks, args, failed)
    output = Path(args.output_dir)
    command = command_line(argv, "benchmarks/speed.py")
    write_markdown(output / f"{args.name}.md", "Speed and memory", env, body, command)
    payload = {"environment": env, "command": command, "settings": vars(args), "summary": summary}
    payload.update({"goals": checks, "runs": runs, "failed": failed})
    write_json(output / f"{args.name}.json", payload)
    if not args.no_plot:
        plot(summary, output / f"{args.name}.png")
    print(body)
    return payload


if __name__ == "__main__":
    main()
