"""Build a family's derived data (tokenizers, tokenized corpora) into the data cache; print size, source, licence.

``sigma-repro data lm [--corpus stdlib|wikitext103|text_files] [--root DIR] [--paths P ...]
[--tokenizer sentencepiece|words|bytes] [--vocab-size N]`` reads the corpus, learns its tokenizer
into ``$SIGMA_REPRO_DATA`` (default ``~/.cache/sigma-repro``) unless it is there already, tokenizes
the splits into the cache, and prints what the corpus is. A training run does the same on first use;
this command does it ahead (before a sweep, or on a login node). Each kind of data is a subcommand
(``KINDS``): a family adds its own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

from sigma_repro.data.text import SPLITS, stdlib_corpus, text_files_corpus, tokenize_corpus, wikitext103_corpus
from sigma_repro.data.tokenizers import TOKENIZERS, build_tokenizer, data_cache_dir
from sigma_repro.errors import ConfigError


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", choices=("stdlib", "wikitext103", "text_files"), default="stdlib",
                        help="stdlib: this interpreter's standard library (default); wikitext103: --root; "
                             "text_files: --paths")
    parser.add_argument("--root", help="wikitext103: the dir with wiki.*.tokens (or .raw), or its parent; "
                                       "stdlib: another stdlib dir (default: this interpreter's)")
    parser.add_argument("--paths", nargs="+", help="text_files: UTF-8 text files, or dirs of *.txt files")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="sentencepiece",
                        help="the tokenizer to learn (default: sentencepiece)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="sentencepiece: pieces (default 4096); words: ids kept (default: every training word)")


def run_lm(args: argparse.Namespace) -> int:
    readers: dict[str, Callable] = {"stdlib": partial(stdlib_corpus, args.root),
                                    "wikitext103": partial(wikitext103_corpus, args.root),
                                    "text_files": partial(text_files_corpus, args.paths)}
    if args.corpus == "wikitext103" and not args.root:
        raise ConfigError("--corpus wikitext103 needs --root, the dir holding wiki.{train,valid,test}.tokens "
                          "(or wikitext-103/ under it).")
    if args.corpus == "text_files" and not args.paths:
        raise ConfigError("--corpus text_files needs --paths, UTF-8 text files or dirs of *.txt files.")
    started = time.perf_counter()
    corpus = readers[args.corpus]()
    read_s = time.perf_counter() - started
    tokenizer = build_tokenizer(args.tokenizer, corpus_id=corpus.corpus_id, training_texts=corpus.documents["train"],
                                vocab_size=args.vocab_size)
    streams = tokenize_corpus(corpus, tokenizer)
    facts = {**corpus.describe(), **tokenizer.describe()}
    print(f"corpus     {corpus.name} ({corpus.corpus_id})")
    print(f"source     {corpus.source}")
    print(f"licence    {corpus.licence}")
    if facts.get("python_version"):
        print(f"python     {facts['python_version']} ({facts['python_implementation']})")
    if facts.get("layout"):
        print(f"layout     {facts['layout']}")
    print(f"sha256     {corpus.sha256}")
    print(f"{'split':<10} {'bytes':>14} {'tokens':>14} {'bytes/token':>12}")
    for split in SPLITS:
        ratio = corpus.bytes[split] / max(len(streams[split]), 1)
        print(f"{split:<10} {corpus.bytes[split]:>14,} {len(streams[split]):>14,} {ratio:>12.3f}")
    print(f"{'total':<10} {sum(corpus.bytes.values()):>14,} {sum(map(len, streams.values())):>14,}")
    print(f"tokenizer  {tokenizer.name}, vocabulary {tokenizer.vocab_size}"
          + (f", sha256 {facts['tokenizer_sha256'][:16]}" if "tokenizer_sha256" in facts else ""))
    print(f"cache      {data_cache_dir()}" + ("" if tokenizer.name != "bytes" else " (bytes: nothing to cache)"))
    print(f"took       {time.perf_counter() - started:.1f} s (reading the corpus {read_s:.2f} s)")
    return 0


KINDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "lm": (add_lm_arguments, run_lm, "causal LM corpora: stdlib, WikiText-103, your text files"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="data_kind", required=True)
    for name, (add, run_kind, help_text) in KINDS.items():
        add(kinds.add_parser(name, help=help_text, description=help_text))
        kinds.choices[name].set_defaults(run_kind=run_kind)


def run(args: argparse.Namespace) -> int:
    return args.run_kind(args)
