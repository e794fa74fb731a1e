"""Translate text with a trained translation run: one hypothesis per input line.

``sigma-repro translate <run dir> --input file.en [--output file.de] [--beam 4] [--lenpen 0.6] [--greedy]
[--average N]`` rebuilds the run's model and tokenizer from its ``summary.json`` (the data cache must
hold the run's tokenizer, as on the machine that trained it: ``sigma-repro data translation`` builds it),
loads ``checkpoints/last.ckpt`` (or the average of the last N weight snapshots the run kept with
``task.average_last``), and writes the translations in input order, detokenised, one per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from sigma_repro.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run dir of task=translation (holds summary.json and checkpoints/)")
    parser.add_argument("--input", required=True, help="UTF-8 text, one source sentence per line ('-': stdin)")
    parser.add_argument("--output", help="where to write the translations (default: stdout)")
    parser.add_argument("--beam", type=int, default=4, help="beam size (default 4, Admin's recipe)")
    parser.add_argument("--lenpen", type=float, default=0.6,
                        help="length penalty: score = log-prob / length^lenpen (fairseq's; default 0.6)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of the beam")
    parser.add_argument("--max-len-a", type=float, default=1.5, help="stop at a * source length + b tokens (a)")
    parser.add_argument("--max-len-b", type=int, default=10, help="stop at a * source length + b tokens (b)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences decoded together (default 32)")
    parser.add_argument("--average", type=int, default=0,
                        help="average the last N weight snapshots of checkpoints/average/ (runs with "
                             "task.average_last > 0) instead of loading last.ckpt")


def load_translation_run(run_dir: Path, *, average: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, data module, the run's summary) of a translation run dir."""
    from sigma_repro.tasks.translation import average_state_dicts, refit_sigma
    from sigma_repro.train import load_last_weights, rebuild_run

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{summary_path} not found: expected a run dir of sigma-repro-train task=translation "
                          f"(it holds summary.json and checkpoints/). Check the path.")
    summary = json.loads(summary_path.read_text())
    config = summary.get("config") or {}
    target = config.get("task", {}).get("_target_", "")
    if not target.endswith("TranslationTask"):
        raise ConfigError(f"{run_dir} is a run of {target or 'an unknown task'}, not of task=translation; "
                          f"sigma-repro translate needs a translation run dir.")
    model, datamodule = rebuild_run(summary)
    if average:
        snapshots = sorted((run_dir / "checkpoints" / "average").glob("step=*.pt"))
        if len(snapshots) < average:
            raise ConfigError(f"--average {average} needs {average} weight snapshots in "
                              f"{run_dir / 'checkpoints' / 'average'}; found {len(snapshots)} (the run keeps "
                              f"task.average_last of them). Ask for at most {len(snapshots)}, or 0 for last.ckpt.")
        model.load_state_dict(average_state_dicts(snapshots[-average:]))
        refit_sigma(model)
    else:
        load_last_weights(model, run_dir)
    return model.eval(), datamodule, summary


def translate_lines(model: Any, datamodule: Any, lines: list[str], *, beam: int, lenpen: float, greedy: bool,
                    max_len_a: float, max_len_b: int, batch_size: int) -> list[str]:
    """Detokenised translations of ``lines``, in order; sentences are decoded in batches of similar length."""
    import torch

    from sigma_repro.models.decoding import beam_search, greedy_decode

    hp = {"bos_id": datamodule.task_kwargs["bos_id"], "eos_id": datamodule.task_kwargs["eos_id"],
          "max_len_a": max_len_a, "max_len_b": max_len_b}
    pad = datamodule.task_kwargs["pad_id"]
    encoded = [datamodule.encode_source(line) for line in lines]
    order = sorted(range(len(lines)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
    out: list[str] = [""] * len(lines)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        src = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            src[row, :len(encoded[i])] = torch.as_tensor(encoded[i], dtype=torch.long)
        ids = (greedy_decode(model, src, **hp) if greedy
               else beam_search(model, src, beam_size=beam, lenpen=lenpen, **hp))
        for i, hypothesis in zip(chunk, ids):
            out[i] = datamodule.decode(hypothesis)
    return out


def run(args: argparse.Namespace) -> int:
    if args.beam < 1 or args.batch_size < 1 or args.average < 0 or args.max_len_b < 0 or args.max_len_a < 0:
        raise ConfigError(f"--beam and --batch-size must be >= 1 and --average, --max-len-a, --max-len-b >= 0; "
                          f"found beam {args.beam}, batch size {args.batch_size}, average {args.average}, "
                          f"max-len-a {args.max_len_a}, max-len-b {args.max_len_b}")
    if args.input == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.input)
        if not path.is_file():
            raise ConfigError(f"--input {path} not found: expected a UTF-8 text file, one source sentence per line.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"--input {path} is not UTF-8 ({err}); convert it (e.g. iconv -t utf-8).") from err
    lines = text.splitlines()
    model, datamodule, _ = load_translation_run(args.run_dir, average=args.average)
    started = time.perf_counter()
    translations = translate_lines(model, datamodule, lines, beam=args.beam, lenpen=args.lenpen, greedy=args.greedy,
                                   max_len_a=args.max_len_a, max_len_b=args.max_len_b, batch_size=args.batch_size)
    written = "\n".join(translations) + ("\n" if translations else "")
    if args.output:
        Path(args.output).write_text(written, encoding="utf-8")
    else:
        sys.stdout.write(written)
    how = "greedy" if args.greedy else f"beam {args.beam}, lenpen {args.lenpen}"
    print(f"sigma-repro translate: {len(lines)} sentences ({how}) in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return 0
