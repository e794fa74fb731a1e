"""Build a family's derived data (tokenizers, tokenized corpora) into the data cache; print size, source, licence.

``sigma-repro data lm [--corpus stdlib|wikitext103|text_files] [--root DIR] [--paths P ...]
[--tokenizer sentencepiece|words|bytes] [--vocab-size N]`` reads the corpus, learns its tokenizer
into ``$SIGMA_REPRO_DATA`` (default ``~/.cache/sigma-repro``) unless it is there already, tokenizes
the splits into the cache, and prints what the corpus is. ``sigma-repro data translation [--corpus
gettext_de|wmt|synthetic_translation] [--root DIR] [--vocab-size N]`` does the same for a parallel
corpus (the gettext one is first filtered and split into the cache) and prints its pairs per split,
catalog and filter. ``sigma-repro data speech [--hours H] [--eval-minutes M] [--corpus espeak|librispeech
--root DIR]`` synthesises the embedded spoken corpus into the cache (or checks a LibriSpeech tree) and
prints its utterances, speakers and hours per subset. A training run does the same on first use;
this command does it ahead (before a sweep, or on a login node). Each kind of data is a subcommand
(``KINDS``): a family adds its own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

from sigma_repro.data import audio, parallel, speech
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


def add_translation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", choices=("gettext_de", "wmt", "synthetic_translation"), default="gettext_de",
                        help="gettext_de: the system's En->De gettext catalogs (default); wmt: --root; "
                             "synthetic_translation: the generated toy task")
    parser.add_argument("--root", help=f"gettext_de: the locale dir (default {parallel.GETTEXT_LOCALE_DIR}); wmt: the "
                                       "dir holding {train,valid,test}.{en,de}")
    parser.add_argument("--min-pairs", type=int, default=parallel.GETTEXT_MIN_PAIRS,
                        help=f"gettext_de: fewer usable pairs is an error (default {parallel.GETTEXT_MIN_PAIRS})")
    parser.add_argument("--src-lang", default="en", help="wmt: the source files' suffix (default en)")
    parser.add_argument("--tgt-lang", default="de", help="wmt: the target files' suffix (default de)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"joint sentencepiece pieces (default: gettext_de {parallel.GETTEXT_VOCAB}, wmt "
                             f"{parallel.WMT_VOCAB}, synthetic_translation {parallel.SYNTHETIC_VOCAB})")


def run_translation(args: argparse.Namespace) -> int:
    if args.corpus == "wmt" and not args.root:
        raise ConfigError("--corpus wmt needs --root, the dir holding train.en, train.de, valid.*, test.* (one "
                          "sentence per line).")
    if args.corpus == "synthetic_translation" and args.root:
        raise ConfigError("--corpus synthetic_translation is generated and reads no files: leave out --root.")
    readers: dict[str, tuple[Callable[[], parallel.ParallelCorpus], int]] = {
        "gettext_de": (partial(parallel.gettext_corpus, args.root or parallel.GETTEXT_LOCALE_DIR, "de",
                               min_pairs=args.min_pairs), parallel.GETTEXT_VOCAB),
        "wmt": (partial(parallel.wmt_corpus, args.root, args.src_lang, args.tgt_lang), parallel.WMT_VOCAB),
        "synthetic_translation": (parallel.synthetic_corpus, parallel.SYNTHETIC_VOCAB)}
    read, default_vocab = readers[args.corpus]
    started = time.perf_counter()
    corpus = read()
    read_s = time.perf_counter() - started
    tokenizer = parallel.learn_tokenizer(corpus, args.vocab_size or default_vocab)
    tokenizer_s = time.perf_counter() - started - read_s
    encoded = parallel.encode_corpus(corpus, tokenizer)
    encode_s = time.perf_counter() - started - read_s - tokenizer_s
    facts = {**corpus.describe(), **tokenizer.describe()}
    print(f"corpus     {corpus.name} ({corpus.corpus_id}), {corpus.src_lang} -> {corpus.tgt_lang}")
    print(f"source     {corpus.source}")
    print(f"licence    {corpus.licence}")
    print(f"sha256     {corpus.sha256}")
    print(f"{'split':<10} {'pairs':>12} {'src tokens':>14} {'tgt tokens':>14}")
    for split in SPLITS:
        sources, targets = encoded[split]
        print(f"{split:<10} {corpus.pairs[split]:>12,} {int(sources.lengths.sum()):>14,} "
              f"{int(targets.lengths.sum()):>14,}")
    print(f"{'total':<10} {sum(corpus.pairs.values()):>12,}")
    if "filters" in facts:
        print("filtered   " + ", ".join(f"{rule} {facts['filters'][rule]:,}" for rule in parallel.GETTEXT_FILTERS))
        top = sorted(facts["pairs_per_catalog"].items(), key=lambda item: (-item[1], item[0]))
        print(f"catalogs   {facts['catalogs_read']} read; most pairs: "
              + ", ".join(f"{name} {count:,}" for name, count in top[:10]))
        for name, reason in facts["skipped_catalogs"].items():
            print(f"skipped    {name}: {reason}")
        for name, charset in facts["non_utf8_catalogs"].items():
            print(f"charset    {name}: {charset} (decoded with it)")
        print(f"prepared   {facts['prepared']}")
    print(f"tokenizer  {tokenizer.name}, vocabulary {tokenizer.vocab_size}, sha256 {facts['tokenizer_sha256'][:16]}")
    print(f"cache      {data_cache_dir()}")
    print(f"took       {time.perf_counter() - started:.1f} s (the corpus {read_s:.2f} s, the tokenizer {tokenizer_s:.2f} s, "
          f"encoding {encode_s:.2f} s; each read from the cache when there)")
    return 0


def add_speech_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", choices=("espeak", "librispeech"), default="espeak",
                        help="espeak: synthesise the embedded spoken corpus into the cache (default); librispeech: "
                             "check a local tree (--root) and print its size")
    parser.add_argument("--hours", type=float, default=audio.DEFAULT_HOURS,
                        help=f"espeak: hours of training audio (default {audio.DEFAULT_HOURS:g})")
    parser.add_argument("--eval-minutes", type=float, default=audio.DEFAULT_EVAL_MINUTES,
                        help=f"espeak: minutes of dev and of test audio, each (default {audio.DEFAULT_EVAL_MINUTES:g})")
    parser.add_argument("--root", help="librispeech: the dir holding LibriSpeech/<subset>/")
    parser.add_argument("--subsets", nargs="+", default=["train-clean-100", "dev-clean", "test-clean"],
                        help="librispeech: the subsets to check (default train-clean-100 dev-clean test-clean)")


def run_speech(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.corpus == "librispeech":
        if not args.root:
            raise ConfigError("--corpus librispeech needs --root, the dir holding LibriSpeech/<subset>/ (LibriSpeech "
                              "from openslr.org/12, extracted there).")
        print(f"corpus     librispeech under {args.root}")
        print("licence    CC BY 4.0 (LibriSpeech, openslr.org/12)")
        splits = {subset: speech.read_librispeech(args.root, [subset], key="--subsets") for subset in args.subsets}
    else:
        directory = audio.espeak_corpus_dir(args.hours, args.eval_minutes)
        manifest = audio.read_manifest(directory)
        print(f"corpus     espeak ({directory.name})")
        print(f"source     {manifest['source']}")
        print(f"licence    {manifest['licence']}")
        print(f"sha256     {manifest['sha256']}")
        print(f"voices     {len(audio.BASE_VOICES)} accents ({', '.join(audio.BASE_VOICES)}) x variants "
              + "; ".join(f"{split} {'/'.join(audio.VOICE_VARIANTS[split])}" for split in audio.VOICE_VARIANTS)
              + f", at {'/'.join(map(str, audio.RATES))} wpm")
        splits = {subset: speech.read_librispeech(directory, [subset], key="the corpus")
                  for subset in audio.ESPEAK_SUBSETS.values()}
    print(f"{'subset':<18} {'utterances':>10} {'speakers':>9} {'hours':>8} {'words':>9}")
    for subset, split in splits.items():
        print(f"{subset:<18} {len(split):>10,} {len({i.split('-')[0] for i in split.ids}):>9,} {split.hours:>8.3f} "
              f"{sum(len(t.split()) for t in split.transcripts):>9,}")
    if args.corpus == "espeak":
        print(f"cache      {directory}")
    print(f"took       {time.perf_counter() - started:.1f} s (building the corpus when it was not in the cache, "
          "reading every file's header)")
    return 0


KINDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "lm": (add_lm_arguments, run_lm, "causal LM corpora: stdlib, WikiText-103, your text files"),
    "translation": (add_translation_arguments, run_translation,
                    "parallel corpora: the system's gettext catalogs (En->De), WMT raw text, a synthetic task"),
    "speech": (add_speech_arguments, run_speech,
               "spoken corpora: stdlib sentences spoken by espeak-ng (built into the cache), LibriSpeech trees"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="data_kind", required=True)
    for name, (add, run_kind, help_text) in KINDS.items():
        add(kinds.add_parser(name, help=help_text, description=help_text))
        kinds.choices[name].set_defaults(run_kind=run_kind)


def run(args: argparse.Namespace) -> int:
    return args.run_kind(args)
