#!/usr/bin/env python
"""Where a training step's time goes, per contender: the profile behind the GPU speed work.

    python benchmarks/profile_step.py --device cuda --mixed_precision bf16 --batch 4 \
        --contenders peft-lora lora flora liera-tucker-exp liera-lowrank-exp --name profile_cuda_bf16

Every contender trains the same UNet (`--config`, random weights, the `attn+conv` targets of
`benchmarks/speed.py`), one after the other in this process, each on its own copy of the base. For each:

- step time (CUDA events, median) and host time (the Python of a step, until it returns without waiting
  for the device): a host time close to the step time means launches, not arithmetic, bound the step;
- from `torch.profiler` over `--profile-steps` steps: device kernels and host-device synchronisations per
  step, the device's busy time, and the top operators by device and by host time;
- the training step (forward and backward) of single adapted layers of each kind, on the inputs they get
  inside the UNet, against the same layer without an adapter.

speed.py is the benchmark (fresh process per contender, inference, memory, loading); this is the
microscope. Results: `<output-dir>/<name>.{md,json}`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS_DIR,
    command_line,
    environment,
    markdown_table,
    median,
    write_json,
    write_markdown,
)
from benchmarks.speed import (
    CONTENDERS,
    HALF_DTYPES,
    REFERENCE,
    added_conditioning,
    build_unet,
    contender_for,
    target_names,
)

# One module of each kind the `attn+conv` preset adapts on the SD 1.5 UNet (names on other configs
# that lack one are skipped).
SAMPLE_LAYERS = (
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv, 320 channels, full resolution
    "mid_block.resnets.0.conv1",  # 3x3 conv, 1280 channels, 1/8 resolution
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # self-attention, many tokens
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",  # cross-attention, 77 tokens
    "down_blocks.0.attentions.0.proj_in",
)
# Host waits for the device; `.item()` and friends read a scalar (a wait only for a device tensor).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SCALAR_READS = "aten::_local_scalar_dense"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="UNet config JSON (default: speed.py's SD 1.5 one).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixed_precision", choices=list(HALF_DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--contenders", nargs="+", default=[REFERENCE, "lora", "flora", "liera-tucker-exp"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps.")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--layer-repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="Operators listed per table.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="profile_step")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; known: {sorted(CONTENDERS)}")
    if args.config is None:
        from benchmarks.speed import DEFAULT_CONFIG

        args.config = str(DEFAULT_CONFIG)
    return args


class Timer:
    """Device time between two points, with CUDA events on a GPU and the wall clock elsewhere."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __call__(self, fn) -> tuple[float, float]:
        """(step seconds, host seconds): the host time ends when `fn` returns, before any wait."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        fn()
        host = time.perf_counter() - begin
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000, host
        return time.perf_counter() - begin, host


def profile_counts(prof, steps: int, top: int) -> dict:
    """Kernels, synchronisations and busy device time per step, from a profiler's events."""
    from torch.autograd import DeviceType

    events, averages = prof.events(), prof.key_averages()
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    syncs = {name: sum(e.name == name for e in events) / steps for name in (*SYNC_EVENTS, SCALAR_READS)}
    return {
        "kernels_per_step": len(device_events) / steps,
        "device_busy_ms_per_step": sum(e.device_time for e in device_events) / 1000 / steps,
        "launches_per_step": sum(
            e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC") for e in events
        )
        / steps,
        "syncs_per_step": syncs,
        "top_device": _top(averages, "self_device_time_total", top),
        "top_host": _top(averages, "self_cpu_time_total", top),
    }


def _top(averages, key: str, top: int) -> str:
    """The `top` operators by `key`, as torch.profiler's table."""
    try:
        return averages.table(sort_by=key, row_limit=top, max_name_column_width=60)
    except (AttributeError, KeyError, TypeError):  # older torch calls device time "cuda"
        return averages.table(sort_by=key.replace("device", "cuda"), row_limit=top)


def layer_costs(unet, captured: dict, timer: Timer, repeats: int, autocast) -> dict[str, dict]:
    """Forward+backward seconds of each sampled layer, adapted and bare, on its captured input."""

    costs = {}
    for name, x in captured.items():
        module = unet.get_submodule(name)
        bare = getattr(module, "base_layer", None) or getattr(module, "org_module", [None])[0] or module
        x = x.detach().requires_grad_(True)

        def step(layer=module, x=x):
            with autocast:
                out = layer(x)
            out.float().square().mean().backward()

        def bare_step(layer=bare, x=x):
            with autocast:
                out = layer(x)
            out.float().square().mean().backward()

        row = {}
        for label, fn in (("adapted", step), ("bare", bare_step)):
            for _ in range(3):
                fn()
            row[label] = median([timer(fn)[0] for _ in range(repeats)])
        row["ratio"] = row["adapted"] / row["bare"]
        row["input"] = list(x.shape)
        row["weight"] = list(bare.weight.shape)
        costs[name] = row
        unet.zero_grad(set_to_none=True)
        x.grad = None
    return costs


def profile_contender(name: str, base, inputs: dict, args, timer: Timer) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    half = getattr(torch, HALF_DTYPES[args.mixed_precision]) if args.mixed_precision != "no" else None
    autocast = torch.autocast(torch.device(args.device).type, dtype=half, enabled=half is not None)
    library, options = CONTENDERS[name]
    contender = contender_for(library, options)
    unet = copy.deepcopy(base)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    modules = contender.attach(unet, target_names(unet, options.get("targets", "attn+conv")))
    params = contender.trainable(unet)
    for param in params:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet.train()

    def train_step() -> None:
        with autocast:
            prediction = unet(inputs["latents"], inputs["timesteps"], inputs["context"], **inputs["extra"])[0]
        torch.nn.functional.mse_loss(prediction.float(), inputs["target"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        train_step()
    times = [timer(train_step) for _ in range(args.steps)]
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20 if cuda else float("nan")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            train_step()
        if cuda:
            torch.cuda.synchronize()
    counts = profile_counts(prof, args.profile_steps, args.top)

    captured = {}
    hooks = [
        unet.get_submodule(layer).register_forward_pre_hook(
            lambda module, inp, layer=layer: captured.setdefault(layer, inp[0].detach().clone())
        )
        for layer in SAMPLE_LAYERS
        if _has(unet, layer)
    ]
    with torch.no_grad(), autocast:
        unet(inputs["latents"], inputs["timesteps"], inputs["context"], **inputs["extra"])
    for hook in hooks:
        hook.remove()
    layers = layer_costs(unet, captured, timer, args.layer_repeats, autocast)
    return {
        "contender": name,
        "modules": modules,
        "step_s": median([t for t, _ in times]),
        "host_s": median([h for _, h in times]),
        "peak_mib": peak,
        **counts,
        "layers": layers,
    }


def _has(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def report(results: dict[str, dict]) -> str:
    reference = results.get(REFERENCE)
    headers = [
        "contender", "step (ms)", "×PEFT", "host (ms)", "host ÷ step", "device busy (ms)", "kernels/step",
        "syncs/step", "scalar reads/step", "peak (MiB)",
    ]  # fmt: skip
    rows = []
    for name, r in results.items():
        syncs = sum(r["syncs_per_step"][name] for name in SYNC_EVENTS)
        ratio = r["step_s"] / reference["step_s"] if reference else float("nan")
        rows.append([
            f"`{name}`", f"{1000 * r['step_s']:.1f}", f"**{ratio:.2f}**", f"{1000 * r['host_s']:.1f}",
            f"{r['host_s'] / r['step_s']:.2f}", f"{r['device_busy_ms_per_step']:.1f}",
            f"{r['kernels_per_step']:.0f}", f"{syncs:.0f}", f"{r['syncs_per_step'][SCALAR_READS]:.0f}",
            f"{r['peak_mib']:.0f}",
        ])  # fmt: skip
    layer_rows = [
        [f"`{name}`", f"`{layer}`", str(row["weight"]), str(row["input"]), f"{1e6 * row['bare']:.0f}",
         f"{1e6 * row['adapted']:.0f}", f"**{row['ratio']:.2f}**"]
        for name, r in results.items()
        for layer, row in r["layers"].items()
    ]  # fmt: skip
    parts = [
        "## Training step",
        markdown_table(headers, rows),
        "Host time: the step's Python until it returns, without waiting for the device; near the step "
        "time, launches bound the step. Device busy: the sum of the kernels' times. Syncs: "
        "cudaStreamSynchronize, cudaDeviceSynchronize and cudaEventSynchronize calls; scalar reads: "
        "`aten::_local_scalar_dense` (`.item()`, a host wait only on a device tensor: AdamW reads its "
        "step counters, on the CPU, this way).",
        "## One layer's training step (forward + backward), adapted vs bare, microseconds",
        markdown_table(
            ["contender", "layer", "weight", "input", "bare (µs)", "adapted (µs)", "×bare"], layer_rows
        ),
    ]
    for name, r in results.items():
        parts += [f"## `{name}`: top operators by device time", "```\n" + r["top_device"] + "\n```"]
        parts += [f"## `{name}`: top operators by host time", "```\n" + r["top_host"] + "\n```"]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = args.device
    half = getattr(torch, HALF_DTYPES[args.mixed_precision]) if args.mixed_precision != "no" else None
    torch.manual_seed(0)
    base = build_unet(args.config, device).to(device, dtype=half)
    base.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    size, batch = args.latent_size, args.batch
    inputs = {
        "latents": torch.randn(batch, base.config.in_channels, size, size, generator=generator).to(
            device, half
        ),
        "target": torch.randn(batch, base.config.out_channels, size, size, generator=generator).to(device),
        "context": torch.randn(batch, 77, base.config.cross_attention_dim, generator=generator).to(
            device, half
        ),
        "timesteps": torch.full((batch,), 500, device=device),
    }
    added = added_conditioning(base.config, batch, generator)
    extra = {"return_dict": False}
    if added is not None:
        extra["added_cond_kwargs"] = {k: v.to(device, half) for k, v in added.items()}
    inputs["extra"] = extra
    timer = Timer(device)
    results = {}
    for name in args.contenders:
        print(f"profiling {name}", flush=True)
        results[name] = profile_contender(name, base, inputs, args, timer)
        gc.collect()  # the contender's copy of the UNet, and the profiler's events, go before the next
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        r = results[name]
        print(f"  step {1000 * r['step_s']:.1f} ms, host {1000 * r['host_s']:.1f} ms, "
              f"{r['kernels_per_step']:.0f} kernels, busy {r['device_busy_ms_per_step']:.1f} ms", flush=True)  # fmt: skip
    body = report(results)
    env = environment(device)
    command = command_line(argv, "benchmarks/profile_step.py")
    output = Path(args.output_dir)
    write_markdown(output / f"{args.name}.md", "Training-step profile", env, body, command)
    write_json(output / f"{args.name}.json", {"environment": env, "command": command, "settings": vars(args),
                                               "results": results})  # fmt: skip
    print(body)
    return results


if __name__ == "__main__":
    main()
