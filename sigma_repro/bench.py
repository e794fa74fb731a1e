"""`sigma-repro bench <benchmark>`: performance measurements, written as a table and a JSON record.

cli.py hands the `bench` parser to `add_arguments` and the parsed namespace to `run`. Each
benchmark is one entry of BENCHMARKS (help line, its argument adder, its runner); add an entry to
add a subcommand. `machine_info` and `time_call` are shared, so every record says where and how it
was measured.

`bench reparam` answers: what does σReparam cost per training step, at `--power-iters` power
iterations per update of W? It times forward, backward and an AdamW step of the same model with
and without σReparam in one process, interleaved (plain, reparam, plain, ...) so both see the same
machine load, and reports medians after warmup. `--task vit` (default): a timm ViT on random
images; `--task lm`: a GPT from conf/model/gpt_*.yaml on random byte tokens, by default the
family's default run (gpt_tiny, vocabulary 256, block 128, batch 32 as data=stdlib) and batch 8,
also reporting tokens/s; `--task translation`: an encoder-decoder from conf/model/mt_*.yaml on
random sentence pairs (default mt_tiny, vocabulary 6,000 and 64 pairs as data=gettext_de, source and
target 32 tokens), reporting target tokens/s, and then decoding speed of both models (sentences/s,
greedy and beam search with conf/task/translation.yaml's beam, length penalty and length limit, on
``--decode-sentences`` random sources; eos is kept out of the untrained models' choices until the
length limit forces it, so every hypothesis has the same length and both models the same workload);
`--task asr`: a speech model from conf/model/{conformer,speech_transformer}*.yaml (default
conformer_tiny) on random 80-bin log-mel batches of ``--seq-len`` frames (10 ms each; lengths spread
over the last 10% as in a length-bucketed batch) with a CTC loss on random character labels
(vocabulary 29), reporting frames/s, and then feature-extraction throughput in hours of audio per
minute of the data's own feature functions (see ``_time_asr_features``).
Wall time is synchronised with the GPU; on a shared CPU it is noisy, so process time is recorded
too. The goal this was written for (2 CPU cores, a realistic batch: ViT-S/16 at 224 batch >= 16,
the LM at batch 32 x 128 tokens: <= 1.05x) is reported, not asserted.

`bench diagnostics` answers: what does the AttentionDiagnostics callback cost? It trains the real
ClassificationTask on the real DigitsDataModule with a model from conf/model/ (default the digits
proxy ViT; a bigger width is a timm size at a smaller patch) in a Lightning Trainer (no logger, no
checkpoints, no validation), once without and once with the callback at every_n_steps, and times
each training step, each probe and each gradient read of the real callback. The overhead is
amortised: (probe + gradient read) / (every_n_steps × step time), all three medians from the run
with the callback, so a change of machine load between the two runs does not enter it; the goal
(<= 2% at every_n_steps=100) is reported, not asserted. The measured ratio of the two runs'
training times is recorded beside it; on a shared CPU it is the noisier number.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sigma_repro import provenance
from sigma_repro.config import CONF_DIR
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
        # the command as typed, without the machine's path to the program (`python -m sigma_repro.cli`, a venv)
        "command": shlex.join(["sigma-repro", *sys.argv[1:]]),
        # runnable processes averaged over 1, 5, 15 minutes: above the usable cores, others shared the machine
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
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


def _lm_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("gpt_*.yaml"))


def _mt_models() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("mt_*.yaml"))


def _asr_models() -> list[str]:
    return sorted(p.stem for pattern in ("conformer*.yaml", "speech_transformer*.yaml")
                  for p in (CONF_DIR / "model").glob(pattern))


def _add_reparam_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=list(REPARAM_SUBJECTS), default="vit",
                        help="vit: a timm ViT on images; lm: a GPT (conf/model/gpt_*.yaml) on tokens; translation: "
                             "an encoder-decoder (conf/model/mt_*.yaml) on sentence pairs, and its decoding speed; "
                             "asr: a speech model (conf/model/conformer*.yaml, speech_transformer*.yaml) on log-mel "
                             "features with a CTC loss, and feature-extraction throughput")
    parser.add_argument("--model", choices=[*VIT_SIZES, *_lm_models(), *_mt_models(), *_asr_models()], default=None,
                        help="vit: timm ViT size, patch 16 (default vit_small); lm, translation, asr: model config "
                             "(default gpt_tiny, mt_tiny, conformer_tiny)")
    parser.add_argument("--depth", type=int, default=None,
                        help="number of blocks (translation: layers of each stack; default: the size's)")
    parser.add_argument("--img-size", type=int, default=None, help="vit only (default 224)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="lm: tokens per sequence (default 128); translation: source and target tokens (default "
                             "32); asr: feature frames of the longest utterance, 10 ms each (default 400)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="lm (default 256, bytes), translation (default 6000), asr (default 29: blank + 28 characters)")
    parser.add_argument("--batch-sizes", type=_positive_ints, default=None,
                        help="e.g. 1,4,16 (default: vit 1,4,16; lm 8,32; translation 16,64; asr 8,32)")
    parser.add_argument("--decode-sentences", type=int, default=None,
                        help="translation only: source sentences decoded at once (default 64)")
    parser.add_argument("--decode-repeats", type=int, default=None,
                        help="translation only: timed decodings per model and method (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model and batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model and batch size first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (compile time in warmup)")
    parser.add_argument("--qkv", choices=list(QKV_MODES), default="fused", help="σ/γ per fused qkv matrix")
    parser.add_argument("--power-iters", type=int, default=1, help="σReparam's power iterations per update of W")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")


class BenchSubject(NamedTuple):
    """What `bench reparam` trains for one --task: the plain model, ``batch(n) -> (inputs, targets)``
    on the device (``model(*inputs)`` gives the model's output), the header's description, (unit, units per
    example) for a throughput column, or None, and ``loss(output, targets)``, the training loss (None:
    ``_cross_entropy``)."""

    model: nn.Module
    batch: Callable[[int], tuple[tuple[torch.Tensor, ...], object]]  # n -> (model inputs, targets)
    title: str
    units: tuple[str, int] | None
    loss: Callable[[object, object], torch.Tensor] | None = None


def _resolve(args: argparse.Namespace, task: str, defaults: dict, foreign: tuple[str, ...]) -> None:
    """Fill ``task``'s defaults into ``args`` (so the record holds what ran); refuse the other task's options."""
    given = [f"--{name.replace('_', '-')}" for name in foreign if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"option(s) {', '.join(given)} do not apply to --task {task}; drop them or pick the --task "
                          f"they belong to")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _vit_subject(args: argparse.Namespace, device: torch.device) -> BenchSubject:
    """A timm ViT (patch 16, 1000 classes) on random images."""
    _resolve(args, "vit", {"model": "vit_small", "img_size": 224, "batch_sizes": [1, 4, 16]},
             ("seq_len", "vocab_size", *DECODE_OPTIONS))
    if args.model not in VIT_SIZES:
        raise ConfigError(f"--task vit takes a ViT size {list(VIT_SIZES)}, got --model {args.model}; "
                          f"GPT configs go with --task lm")
    torch.manual_seed(0)
    size = {**VIT_SIZES[args.model], **({"depth": args.depth} if args.depth else {})}
    plain = VisionTransformer(img_size=args.img_size, patch_size=16, num_classes=1000, **size)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(n, 3, args.img_size, args.img_size, device=device)
        return (images,), torch.randint(0, 1000, (n,), device=device)

    return BenchSubject(plain, batch, f"{args.model} depth {args.depth or 12}, img {args.img_size}", None)


def _lm_subject(args: argparse.Namespace, device: torch.device) -> BenchSubject:
    """A GPT from conf/model/<model>.yaml, as the app builds it, on random tokens (next-token targets)."""
    import hydra.utils
    from omegaconf import OmegaConf

    _resolve(args, "lm", {"model": "gpt_tiny", "seq_len": 128, "vocab_size": 256, "batch_sizes": [8, 32]},
             ("img_size", *DECODE_OPTIONS))
    if args.model not in _lm_models():
        raise ConfigError(f"--task lm takes a GPT config {_lm_models()}, got --model {args.model}; "
                          f"ViT sizes go with --task vit")
    if args.seq_len < 1 or args.vocab_size < 1:
        raise ConfigError(f"--seq-len and --vocab-size must be >= 1, got {args.seq_len} and {args.vocab_size}")
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml")
    if args.depth:
        cfg.depth = args.depth
    torch.manual_seed(0)
    plain = hydra.utils.instantiate(cfg, vocab_size=args.vocab_size, max_seq_len=args.seq_len)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, args.vocab_size, (n, args.seq_len + 1), device=device)
        return (tokens[:, :-1],), tokens[:, 1:]  # (n, T) inputs and their next tokens

    params = sum(p.numel() for p in plain.parameters())
    title = (f"{args.model} (depth {cfg.depth}, dim {cfg.dim}, {params / 1e6:.2f}M parameters), "
             f"seq {args.seq_len}, vocab {args.vocab_size}")
    return BenchSubject(plain, batch, title, ("tokens", args.seq_len))


DECODE_OPTIONS = ("decode_sentences", "decode_repeats")  # translation only
# the special ids of the translation data (sigma_repro.data.parallel): 0 pad, 1 unk, 2 bos, 3 eos
PAD_ID, BOS_ID, EOS_ID, FIRST_WORD_ID = 0, 2, 3, 4


def _mt_subject(args: argparse.Namespace, device: torch.device) -> BenchSubject:
    """An encoder-decoder from conf/model/<model>.yaml, as the app builds it, on random sentence pairs of
    ``seq_len`` source and target tokens without padding (teacher forcing: bos + target in, target out)."""
    import hydra.utils
    from omegaconf import OmegaConf

    _resolve(args, "translation", {"model": "mt_tiny", "seq_len": 32, "vocab_size": 6000, "batch_sizes": [16, 64],
                                   "decode_sentences": 64, "decode_repeats": 3}, ("img_size",))
    if args.model not in _mt_models():
        raise ConfigError(f"--task translation takes an encoder-decoder config {_mt_models()}, got --model "
                          f"{args.model}; ViT sizes go with --task vit, GPT configs with --task lm")
    if args.seq_len < 1 or args.vocab_size <= FIRST_WORD_ID or args.decode_sentences < 1 or args.decode_repeats < 1:
        raise ConfigError(f"--seq-len, --decode-sentences and --decode-repeats must be >= 1 and --vocab-size > "
                          f"{FIRST_WORD_ID} (ids 0-3 are pad, unk, bos, eos); got {args.seq_len}, "
                          f"{args.decode_sentences}, {args.decode_repeats} and {args.vocab_size}")
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml")
    if args.depth:
        cfg.depth = args.depth
    torch.manual_seed(0)
    # positions for the longest decoded hypothesis too: bos + max_len_a * (seq_len) + max_len_b tokens
    task = OmegaConf.load(CONF_DIR / "task" / "translation.yaml")
    max_positions = max(args.seq_len + 1, int(task.max_len_a * args.seq_len + task.max_len_b) + 2)
    plain = hydra.utils.instantiate(cfg, vocab_size=args.vocab_size, pad_id=PAD_ID, max_positions=max_positions)

    def batch(n: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        # as the data's batches: source ids + eos; bos + target ids in, target ids + eos out
        src = torch.randint(FIRST_WORD_ID, args.vocab_size, (n, args.seq_len), device=device)
        tgt = torch.randint(FIRST_WORD_ID, args.vocab_size, (n, args.seq_len + 1), device=device)
        src[:, -1], tgt[:, 0], tgt[:, -1] = EOS_ID, BOS_ID, EOS_ID
        return (src, tgt[:, :-1]), tgt[:, 1:]  # (n, S) source, (n, T) bos + target; (n, T) target + eos

    params = sum(p.numel() for p in plain.parameters())
    encoder, decoder = (cfg.get(f"{stack}_depth") or cfg.depth for stack in ("encoder", "decoder"))
    title = (f"{args.model} ({encoder}L-{decoder}L, dim {cfg.dim}, {params / 1e6:.2f}M parameters), "
             f"source and target {args.seq_len} tokens, vocab {args.vocab_size}")
    return BenchSubject(plain, batch, title, ("tokens", args.seq_len))


ASR_INPUT_DIM, ASR_FRAMES_PER_SECOND = 80, 100  # log-mel bins, frames a second (10 ms hop)
ASR_CHARACTERS_PER_SECOND = 15  # labels per second of audio (read speech runs at about 15 characters a second)


def _ctc_loss(output: tuple[torch.Tensor, torch.Tensor], targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The asr task's loss (``sigma_repro.tasks.asr.ctc_loss_per_char``, blank 0) of the model's
    ``(logits (B, T', V), out_lengths (B,))`` against ``(labels (B, S), label_lengths (B,))``."""
    from sigma_repro.tasks.asr import ctc_loss_per_char  # imports Lightning: only for --task asr

    (logits, out_lengths), (labels, label_lengths) = output, targets
    return ctc_loss_per_char(logits, out_lengths, labels, label_lengths, blank_id=0)[0]


def _asr_subject(args: argparse.Namespace, device: torch.device) -> BenchSubject:
    """A speech model from conf/model/<model>.yaml, as the app builds it (input_dim 80, vocab_size from
    --vocab-size), on random log-mel batches: the longest utterance ``seq_len`` frames, the others spread
    evenly down to 90% of it (a length-bucketed batch, so the padding masks are timed too), zero-padded;
    random character labels 1..V-1, 15 per second of audio. frames/s counts the padded batch (n x seq_len)."""
    import hydra.utils
    from omegaconf import OmegaConf

    _resolve(args, "asr", {"model": "conformer_tiny", "seq_len": 400, "vocab_size": 29, "batch_sizes": [8, 32]},
             ("img_size", *DECODE_OPTIONS))
    if args.model not in _asr_models():
        raise ConfigError(f"--task asr takes a speech model config {_asr_models()}, got --model {args.model}")
    if args.seq_len < 10 or args.vocab_size < 2:
        raise ConfigError(f"--task asr needs --seq-len >= 10 frames and --vocab-size >= 2 (blank + a character), "
                          f"got {args.seq_len} and {args.vocab_size}")
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml")
    if args.depth:
        cfg.depth = args.depth
    torch.manual_seed(0)
    plain = hydra.utils.instantiate(cfg, input_dim=ASR_INPUT_DIM, vocab_size=args.vocab_size)

    def batch(n: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]:
        lengths = torch.linspace(args.seq_len, 0.9 * args.seq_len, n).long()  # (n,), the longest first
        features = torch.randn(n, args.seq_len, ASR_INPUT_DIM)  # (n, T, 80), zero past each length
        features = features.masked_fill(torch.arange(args.seq_len)[None, :, None] >= lengths[:, None, None], 0.0)
        label_lengths = (lengths * ASR_CHARACTERS_PER_SECOND).div(ASR_FRAMES_PER_SECOND, rounding_mode="floor")
        labels = torch.randint(1, args.vocab_size, (n, int(label_lengths.max())))  # (n, S), no blank
        return (features.to(device), lengths.to(device)), (labels.to(device), label_lengths.to(device))

    params = sum(p.numel() for p in plain.parameters())
    title = (f"{args.model} (depth {cfg.depth}, dim {cfg.dim}, {params / 1e6:.2f}M parameters), utterances of "
             f"{0.9 * args.seq_len / ASR_FRAMES_PER_SECOND:g}-{args.seq_len / ASR_FRAMES_PER_SECOND:g} s "
             f"({ASR_INPUT_DIM} log-mel bins), vocab {args.vocab_size}, CTC loss")
    return BenchSubject(plain, batch, title, ("frames", args.seq_len), _ctc_loss)


REPARAM_SUBJECTS = {"vit": _vit_subject, "lm": _lm_subject, "translation": _mt_subject, "asr": _asr_subject}


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits (..., C) against class ids (...): image labels (B,), next tokens (B, T), target tokens (B, T)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _train_step(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], targets: object, dtype: str,
                loss_fn: Callable[[object, object], torch.Tensor] | None = None) -> Callable[[], None]:
    """One AdamW training step on ``loss_fn(model(*inputs), targets)`` (default ``_cross_entropy``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = loss_fn or _cross_entropy
    device_type = inputs[0].device.type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn(model(*inputs), targets)
        loss.backward()
        optimizer.step()

    return step


def _device(args: argparse.Namespace) -> torch.device:
    """The --device asked for, after --threads is applied; a clear error when CUDA is missing."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def _write_record(record: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2, default=str) + "\n")  # default: Paths
        print(f"wrote {out}")


def _run_reparam(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.power_iters < 1 or args.warmup < 0:
        raise ConfigError(f"--repeats and --power-iters must be >= 1 and --warmup >= 0, "
                          f"got {args.repeats}, {args.power_iters} and {args.warmup}")
    device = _device(args)
    subject = REPARAM_SUBJECTS[args.task](args, device)
    plain = subject.model.to(device).train()
    reparam = apply_sigma_reparam(copy.deepcopy(plain), qkv=args.qkv, power_iters=args.power_iters)
    models = {"plain": plain, "reparam": reparam}
    if args.compile:
        models = {name: torch.compile(model) for name, model in models.items()}

    record = {"benchmark": "reparam", "config": vars(args), "machine": machine_info(device), "results": []}
    _print_reparam_header(record, subject)
    for batch_size in args.batch_sizes:
        inputs, targets = subject.batch(batch_size)
        steps = {name: _train_step(model, inputs, targets, args.dtype, subject.loss) for name, model in models.items()}
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
        if subject.units:
            unit, per_example = subject.units
            result[f"{unit}_per_s"] = {name: batch_size * per_example / medians[name]["wall_s"] for name in models}
        record["results"].append(result)
        _print_reparam_row(result, subject)
    if args.task == "translation":
        record["decoding"] = _time_decoding(args, subject, {"plain": plain, "reparam": reparam}, device)
        _print_decoding(record["decoding"])
    if args.task == "asr":
        record["features"] = _time_asr_features(args)
        _print_asr_features(record["features"])
    _write_record(record, args.out)
    return 0


def _time_decoding(args: argparse.Namespace, subject: BenchSubject, models: dict[str, nn.Module],
                   device: torch.device) -> dict:
    """Greedy and beam-search decoding of ``--decode-sentences`` random sources by each model (eval mode,
    as the task decodes; not compiled; bf16 autocast with --dtype bf16), interleaved as the training steps
    are; the beam, length penalty and length limit are conf/task/translation.yaml's. Medians after one
    untimed decoding (with --warmup > 0).

    An untrained model of this family puts eos first after a token or two (its tied head scores the
    embedding it was fed highest), which would time one-token translations. So while timing, a forward
    hook on the output head lowers eos's logit by 1e4 (one indexed subtraction a step): eos comes only
    where the length limit forces it, and every hypothesis has max_len_a * source + max_len_b tokens."""
    from omegaconf import OmegaConf

    from sigma_repro.models.decoding import beam_search, greedy_decode

    task = OmegaConf.load(CONF_DIR / "task" / "translation.yaml")
    limits = dict(bos_id=BOS_ID, eos_id=EOS_ID, max_len_a=float(task.max_len_a), max_len_b=float(task.max_len_b))
    methods = {"greedy": partial(greedy_decode, **limits),
               "beam": partial(beam_search, beam_size=int(task.beam_size), lenpen=float(task.lenpen), **limits)}
    (src, _), _ = subject.batch(args.decode_sentences)
    samples = {name: {method: [] for method in methods} for name in models}
    lengths = {name: {} for name in models}
    hypotheses: list[list[int]] = []

    def run(decode: Callable, model: nn.Module) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            hypotheses[:] = decode(model, src)

    def no_eos(module: nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, torch.tensor([EOS_ID], device=logits.device), -1e4)  # (B, T, V)

    hooks = [model.head.register_forward_hook(no_eos) for model in models.values()]
    try:
        for repeat in range(min(args.warmup, 1) + args.decode_repeats):
            for method, decode in methods.items():
                for name, model in models.items():
                    wall, _ = time_call(partial(run, decode, model), device)
                    if repeat >= min(args.warmup, 1):
                        samples[name][method].append(wall)
                    lengths[name][method] = sum(map(len, hypotheses)) / len(hypotheses)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "sentences": args.decode_sentences, "source_tokens": args.seq_len, "eos_held_back": True,
        "beam_size": int(task.beam_size), "lenpen": float(task.lenpen),
        "max_len_a": limits["max_len_a"], "max_len_b": limits["max_len_b"],
        **{name: {method: {"wall_s": statistics.median(samples[name][method]), "samples": samples[name][method],
                           "sentences_per_s": args.decode_sentences / statistics.median(samples[name][method]),
                           "mean_hypothesis_tokens": lengths[name][method]}
                  for method in methods} for name in models},
        "ratio": {method: statistics.median(samples["reparam"][method]) / statistics.median(samples["plain"][method])
                  for method in methods},
    }


def _time_asr_features(args: argparse.Namespace) -> dict:
    """Feature-extraction throughput on the CPU: hours of audio made into model features per minute.

    The asr data's own feature functions (``sigma_repro.data.speech``): ``LogMel`` (torchaudio's
    MelSpectrogram at 16 kHz, 25 ms window, 10 ms hop, 80 mel bins, then log) and ``utterance_cmvn``,
    one utterance at a time as the data module prepares them. Audio: max(--batch-sizes) random
    utterances of --seq-len / 100 seconds; median of --repeats passes after one untimed pass (with
    --warmup > 0), at --threads.
    """
    from sigma_repro.data.speech import SAMPLE_RATE, LogMel, utterance_cmvn

    log_mel = LogMel(n_mels=ASR_INPUT_DIM)
    seconds = args.seq_len / ASR_FRAMES_PER_SECOND
    utterances = max(args.batch_sizes)
    generator = torch.Generator().manual_seed(0)
    audio = [0.1 * torch.randn(int(seconds * SAMPLE_RATE), generator=generator) for _ in range(utterances)]

    def extract() -> None:
        for wave in audio:
            utterance_cmvn(log_mel(wave))  # (frames, 80)

    samples = []
    for repeat in range(min(args.warmup, 1) + args.repeats):
        wall, _ = time_call(extract, torch.device("cpu"))
        if repeat >= min(args.warmup, 1):
            samples.append(wall)
    wall = statistics.median(samples)
    return {"recipe": "sigma_repro.data.speech: utterance_cmvn(LogMel(n_mels=80)(waveform)), 16 kHz, one utterance "
                      "at a time",
            "utterances": utterances, "seconds_per_utterance": seconds, "wall_s": wall, "samples": samples,
            "audio_hours_per_minute": utterances * seconds / 3600 / (wall / 60),
            "realtime_factor": utterances * seconds / wall}


def _print_asr_features(f: dict) -> None:
    print(f"feature extraction ({f['recipe']}), {f['utterances']} utterances of {f['seconds_per_utterance']:g} s: "
          f"median {f['wall_s']:.3f} s, {f['audio_hours_per_minute']:.2f} hours of audio per minute "
          f"({f['realtime_factor']:.0f}x real time)", flush=True)


def _print_decoding(d: dict) -> None:
    print(f"decoding {d['sentences']} sources of {d['source_tokens']} tokens (beam {d['beam_size']}, lenpen "
          f"{d['lenpen']:g}, at most {d['max_len_a']:g} x source + {d['max_len_b']:g} tokens), median wall time")
    print(f"{'method':>6}  {'plain s':>8}  {'reparam s':>9}  {'ratio':>6}  {'plain sent/s':>12}  "
          f"{'reparam sent/s':>14}  {'tokens/hyp':>10}")
    for method in ("greedy", "beam"):
        p, r = d["plain"][method], d["reparam"][method]
        print(f"{method:>6}  {p['wall_s']:>8.3f}  {r['wall_s']:>9.3f}  {d['ratio'][method]:>6.3f}  "
              f"{p['sentences_per_s']:>12.1f}  {r['sentences_per_s']:>14.1f}  {p['mean_hypothesis_tokens']:>10.1f}",
              flush=True)


def _print_reparam_header(record: dict, subject: BenchSubject) -> None:
    c, m = record["config"], record["machine"]
    print(f"σReparam training-step time: {subject.title}, "
          f"{m['device_name']}, {c['dtype']}{', compiled' if c['compile'] else ''}, qkv={c['qkv']}, "
          f"power_iters={c['power_iters']}, "
          f"{m['torch_threads']} threads, median of {c['repeats']} after {c['warmup']} warmup")
    rate = f"  {'plain ' + subject.units[0] + '/s':>14}  {'reparam ' + subject.units[0] + '/s':>16}" if subject.units else ""
    print(f"{'batch':>5}  {'plain wall s':>12}  {'reparam wall s':>14}  {'ratio':>6}  "
          f"{'plain cpu s':>11}  {'reparam cpu s':>13}  {'ratio':>6}{rate}", flush=True)


def _print_reparam_row(r: dict, subject: BenchSubject) -> None:
    rate = ""
    if subject.units:
        per_s = r[f"{subject.units[0]}_per_s"]
        rate = f"  {per_s['plain']:>14.0f}  {per_s['reparam']:>16.0f}"
    print(f"{r['batch_size']:>5}  {r['plain']['wall_s']:>12.4f}  {r['reparam']['wall_s']:>14.4f}  "
          f"{r['ratio']['wall_s']:>6.3f}  {r['plain']['process_s']:>11.4f}  "
          f"{r['reparam']['process_s']:>13.4f}  {r['ratio']['process_s']:>6.3f}{rate}", flush=True)


def _add_diagnostics_arguments(parser: argparse.ArgumentParser) -> None:
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    parser.add_argument("--model", choices=models, default="vit_digits", help="a conf/model config, on 8x8 digits")
    parser.add_argument("--patch-size", type=int, default=None, help="override the config's (must divide 8)")
    parser.add_argument("--depth", type=int, default=None, help="override the config's number of blocks")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--every-n-steps", type=int, default=100, help="the callback's probe period")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (conf/data/digits.yaml's)")
    parser.add_argument("--probe-size", type=int, default=64, help="probe batch (conf/callbacks's)")
    parser.add_argument("--reparam", action="store_true", help="apply σReparam to the model in both runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")


def _timed_diagnostics(device: torch.device, **kwargs):
    """The real AttentionDiagnostics, recording the wall time of each probe and gradient read."""
    from sigma_repro.diagnostics.callbacks import AttentionDiagnostics

    class TimedDiagnostics(AttentionDiagnostics):
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.probe_s: list[float] = []
            self.grad_s: list[float] = []

        def _probe_once(self, trainer, pl_module) -> None:
            self._timed(self.probe_s, "steps", partial(AttentionDiagnostics._probe_once, self, trainer, pl_module))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self._timed(self.grad_s, "grad_steps",
                        partial(AttentionDiagnostics.on_before_optimizer_step, self, trainer, pl_module, optimizer))

        def _timed(self, times: list[float], steps_key: str, fn: Callable[[], None]) -> None:
            before = len(self.history[steps_key])
            wall, _ = time_call(fn, device)
            if len(self.history[steps_key]) > before:  # it measured, not skipped a step it had
                times.append(wall)

    return TimedDiagnostics()


def _step_timer(device: torch.device):
    """A callback timing each training step (forward, backward, optimizer; no data loading) and the
    whole training loop. Put it first: its batch-end hook then runs before the probe's."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.train_s = 0.0

        def _now(self) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        def on_train_start(self, *args) -> None:
            self._train_start = self._now()

        def on_train_batch_start(self, *args) -> None:
            self._step_start = self._now()

        def on_train_batch_end(self, *args) -> None:
            self.step_s.append(self._now() - self._step_start)

        def on_train_end(self, *args) -> None:
            self.train_s = self._now() - self._train_start

    return StepTimer()


def _fit_digits(args: argparse.Namespace, device: torch.device, callbacks: list, root: str, steps: int) -> None:
    """Train the configured model on digits for ``steps`` steps, seeded the same every call."""
    import hydra.utils
    import lightning as L
    from omegaconf import OmegaConf

    from sigma_repro.data.images import DigitsDataModule
    from sigma_repro.tasks.classification import ClassificationTask

    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size, seed=0)
    overrides = {k: v for k, v in (("patch_size", args.patch_size), ("depth", args.depth)) if v is not None}
    model = hydra.utils.instantiate(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"), **data.model_kwargs,
                                    **overrides)
    if args.reparam:
        apply_sigma_reparam(model)
    config = {group: OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
              for group, name in (("optim", "adamw"), ("schedule", "constant"))}
    task = ClassificationTask(model, **data.task_kwargs, **config)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks,
    )
    trainer.fit(task, datamodule=data)


def _run_diagnostics(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.every_n_steps < 1:
        raise ConfigError(f"--steps and --every-n-steps must be >= 1, got {args.steps} and {args.every_n_steps}")
    device = _device(args)
    record = {"benchmark": "diagnostics", "config": vars(args), "machine": machine_info(device), "results": {}}
    print(f"AttentionDiagnostics overhead: {args.model} on digits, batch {args.batch_size}, probe {args.probe_size}, "
          f"{args.steps} steps, every_n_steps={args.every_n_steps}, {record['machine']['device_name']}, "
          f"{record['machine']['torch_threads']} threads", flush=True)
    with tempfile.TemporaryDirectory() as root:  # the callback's npz and plots, not wanted here
        # Untimed: one-off costs (library initialisation, first kernels) would land in the first run.
        _fit_digits(args, device, [_timed_diagnostics(device, every_n_steps=1, probe_size=args.probe_size,
                                                      save_dir=root)], root, steps=2)
        runs = {"plain": [_step_timer(device)]}
        runs["diagnostics"] = [_step_timer(device), _timed_diagnostics(
            device, every_n_steps=args.every_n_steps, probe_size=args.probe_size, save_dir=root)]
        for name, callbacks in runs.items():
            _fit_digits(args, device, callbacks, root, args.steps)
            timer = callbacks[0]
            record["results"][name] = {"step_s": statistics.median(timer.step_s), "train_s": timer.train_s,
                                       "samples": timer.step_s}
    diag = runs["diagnostics"][1]  # probes at step 0 and the last step, gradients at step 0 at least
    plain, timed = record["results"]["plain"], record["results"]["diagnostics"]
    timed.update(probe_s=statistics.median(diag.probe_s), probe_samples=diag.probe_s,
                 grad_s=statistics.median(diag.grad_s), grad_samples=diag.grad_s)
    record["results"]["overhead"] = {
        "amortised": (timed["probe_s"] + timed["grad_s"]) / (args.every_n_steps * timed["step_s"]),
        "measured": timed["train_s"] / plain["train_s"] - 1,
    }
    _print_diagnostics(record)
    _write_record(record, args.out)
    return 0


def _print_diagnostics(record: dict) -> None:
    r, every = record["results"], record["config"]["every_n_steps"]
    print(f"medians: step {r['diagnostics']['step_s'] * 1e3:.1f} ms with the callback "
          f"({r['plain']['step_s'] * 1e3:.1f} ms in the plain run), probe {r['diagnostics']['probe_s'] * 1e3:.1f} ms, "
          f"gradient read {r['diagnostics']['grad_s'] * 1e3:.2f} ms")
    print(f"overhead at every_n_steps={every}: amortised {r['overhead']['amortised']:.2%} (goal <= 2%), "
          f"measured training-time ratio {r['overhead']['measured']:+.2%}", flush=True)


BENCHMARKS = {
    "reparam": Benchmark("training-step time of a timm ViT (--task vit), a GPT (--task lm), an encoder-decoder "
                         "(--task translation, and its decoding speed) or a speech model (--task asr, and feature "
                         "extraction throughput) with and without σReparam",
                         _add_reparam_arguments, _run_reparam),
    "diagnostics": Benchmark("overhead of the AttentionDiagnostics callback on the digits ViT",
                             _add_diagnostics_arguments, _run_diagnostics),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One subcommand per entry of BENCHMARKS under `sigma-repro bench`."""
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        benchmark.add_arguments(subparsers.add_parser(name, help=benchmark.help, description=benchmark.help))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named by `args.benchmark`; the exit status."""
    return BENCHMARKS[args.benchmark].run(args)
