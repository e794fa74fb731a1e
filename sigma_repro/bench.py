"""`sigma-repro bench <benchmark>`: performance measurements, written as a table and a JSON record.

cli.py hands the `bench` parser to `add_arguments` and the parsed namespace to `run`. Each
benchmark is one entry of BENCHMARKS (help line, its argument adder, its runner); add an entry to
add a subcommand. `machine_info` and `time_call` are shared, so every record says where and how it
was measured.

`bench reparam` answers: what does σReparam cost per training step? It times forward, backward
and an AdamW step of the same timm ViT with and without σReparam in one process, interleaved
(plain, reparam, plain, ...) so both see the same machine load, and reports medians after warmup.
Wall time is synchronised with the GPU; on a shared CPU it is noisy, so process time is recorded
too. The goal this was written for (ViT-S/16 at 224, batch >= 16, 2 CPU cores: <= 1.05x) is
reported, not asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from sigma_repro import provenance
from sigma_repro.errors import ConfigError
from sigma_repro.reparam import QKV_MODES, apply_sigma_reparam

VIT_SIZES = {  # timm's ViT sizes; patch 16 throughout
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


class Benchmark(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def machine_info(device: torch.device) -> dict:
    """Where a measurement was taken, for the JSON record."""
    return {
        **provenance.machine_info(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": provenance.git_sha(),
        "command": shlex.join(sys.argv),
    }


def time_call(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; waits for queued GPU work on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,4,16, got {text!r}")
    return values


def _add_reparam_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(VIT_SIZES), default="vit_small", help="timm ViT size, patch 16")
    parser.add_argument("--depth", type=int, default=None, help="number of blocks (default: the size's 12)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=_positive_ints, default=[1, 4, 16], help="e.g. 1,4,16")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model and batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model and batch size first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (compile time in warmup)")
    parser.add_argument("--qkv", choices=list(QKV_MODES), default="fused", help="σ/γ per fused qkv matrix")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")


def _train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def _run_reparam(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    size = {**VIT_SIZES[args.model], **({"depth": args.depth} if args.depth else {})}
    plain = VisionTransformer(img_size=args.img_size, patch_size=16, num_classes=1000, **size).to(device).train()
    models = {"plain": plain, "reparam": apply_sigma_reparam(copy.deepcopy(plain), qkv=args.qkv)}
    if args.compile:
        models = {name: torch.compile(model) for name, model in models.items()}

    record = {"benchmark": "reparam", "config": vars(args), "machine": machine_info(device), "results": []}
    _print_reparam_header(record)
    for batch_size in args.batch_sizes:
        images = torch.randn(batch_size, 3, args.img_size, args.img_size, device=device)
        labels = torch.randint(0, 1000, (batch_size,), device=device)
        steps = {name: _train_step(model, images, labels, args.dtype) for name, model in models.items()}
        samples = {name: {"wall_s": [], "process_s": []} for name in models}
        for repeat in range(args.warmup + args.repeats):
            for name, step in steps.items():  # interleaved: both models see the same load
                wall, cpu = time_call(step, device)
                if repeat >= args.warmup:
                    samples[name]["wall_s"].append(wall)
                    samples[name]["process_s"].append(cpu)
        medians = {name: {kind: statistics.median(times) for kind, times in s.items()} for name, s in samples.items()}
        result = {
            "batch_size": batch_size,
            **{name: {**medians[name], "samples": samples[name]} for name in models},
            "ratio": {kind: medians["reparam"][kind] / medians["plain"][kind] for kind in ("wall_s", "process_s")},
        }
        record["results"].append(result)
        _print_reparam_row(result)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # default: Paths
        print(f"wrote {args.out}")
    return 0


def _print_reparam_header(record: dict) -> None:
    c, m = record["config"], record["machine"]
    print(f"σReparam training-step time: {c['model']} depth {c['depth'] or 12}, img {c['img_size']}, "
          f"{m['device_name']}, {c['dtype']}{', compiled' if c['compile'] else ''}, qkv={c['qkv']}, "
          f"{m['torch_threads']} threads, median of {c['repeats']} after {c['warmup']} warmup")
    print(f"{'batch':>5}  {'plain wall s':>12}  {'reparam wall s':>14}  {'ratio':>6}  "
          f"{'plain cpu s':>11}  {'reparam cpu s':>13}  {'ratio':>6}", flush=True)


def _print_reparam_row(r: dict) -> None:
    print(f"{r['batch_size']:>5}  {r['plain']['wall_s']:>12.4f}  {r['reparam']['wall_s']:>14.4f}  "
          f"{r['ratio']['wall_s']:>6.3f}  {r['plain']['process_s']:>11.4f}  "
          f"{r['reparam']['process_s']:>13.4f}  {r['ratio']['process_s']:>6.3f}", flush=True)


BENCHMARKS = {
    "reparam": Benchmark("training-step time of a timm ViT with and without σReparam",
                         _add_reparam_arguments, _run_reparam),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One subcommand per entry of BENCHMARKS under `sigma-repro bench`."""
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        benchmark.add_arguments(subparsers.add_parser(name, help=benchmark.help, description=benchmark.help))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named by `args.benchmark`; the exit status."""
    return BENCHMARKS[args.benchmark].run(args)
