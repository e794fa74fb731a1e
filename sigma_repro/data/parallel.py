"""Parallel corpora and the translation DataModules (``task=translation``), chosen with ``data=<name>``.

| ``data=``                 | class                            | corpus                                          | vocab  |
|---------------------------|----------------------------------|-------------------------------------------------|--------|
| ``gettext_de``            | ``GettextDataModule``            | En->De message catalogs the system carries      | 6000   |
| ``wmt``                   | ``WmtDataModule``                | ``train/valid/test.{en,de}`` raw text (WMT)     | 32000  |
| ``synthetic_translation`` | ``SyntheticTranslationDataModule`` | generated: a word mapping + adjacent swaps    | 400    |

A corpus (``ParallelCorpus``) is three splits, ``train``, ``valid`` and ``test``, each two parallel
lists of sentences (``sources[split][i]`` translates to ``targets[split][i]``); its hash
(``sha256``: of ``source + "\\t" + target + "\\n"`` in UTF-8 for every pair of train, valid and test,
in that order) names it in the data cache. The readers (``gettext_corpus``, ``wmt_corpus``,
``synthetic_corpus``, ``sacrebleu_test_set``) know nothing of models.

The gettext corpus is prepared once (``prepare_gettext``: parse, filter, split; ``sigma-repro data
translation``) into ``<cache>/translation/gettext_<lang>-<hash of the catalogs' bytes and the
rules>/`` as ``{train,valid,test}.{en,<lang>}`` (the WMT layout, one sentence a line) plus a
``manifest.json`` of counts per catalog and filter; later runs hash the catalogs (10 ms) and read it back.

One joint sentencepiece BPE model (``sigma_repro.data.tokenizers``: ids 0 pad, 1 unk, 2 bos
``<s>``, 3 eos ``</s>``, lossless) is learnt from both sides of the training split into the cache,
and each split's sentences are encoded once into ``<cache>/tokens/<corpus id>/sentencepiece-<model
hash>/{split}.{lang}.{ids,offsets}.npy`` (WMT's 4.5M pairs take minutes to encode; read back memory-mapped).

A batch (train, val and test) is a dict of LongTensors: ``src`` (B, S) source ids + eos; ``tgt_in``
(B, T) bos + target ids; ``tgt_out`` (B, T) target ids + eos, all padded with 0 on the right; and
``index`` (B,), each pair's index in its split. Training pairs whose ``src`` or ``tgt_in`` is longer
than ``max_len`` tokens are dropped (counted in ``describe()``); validation and test keep every pair
whole, never truncated: ``model_kwargs["max_positions"]`` is ``2 * longest + 16`` over every
sequence the data holds, which also covers decoding to ``1.5 * source length + 10`` tokens.
Training order is a function of ``(seed, epoch)`` and resumes mid-epoch exactly
(``sigma_repro.data.sampling``).
"""

from __future__ import annotations

import gettext
import hashlib
import io
import itertools
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sigma_repro.data.base import StabilityDataModule, evenly_spaced, is_whole
from sigma_repro.data.sampling import ResumableDataLoader, ResumableSampler, SeededView
from sigma_repro.data.text import SPLITS, hash_split, read_utf8
from sigma_repro.data.tokenizers import SentencePieceTokenizer, build_tokenizer, data_cache_dir, id_dtype, \
    write_atomically
from sigma_repro.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = SentencePieceTokenizer.PAD_ID, SentencePieceTokenizer.BOS_ID, SentencePieceTokenizer.EOS_ID
GETTEXT_VOCAB, WMT_VOCAB, SYNTHETIC_VOCAB = 6000, 32000, 400  # sentencepiece pieces by default


# --- corpora -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelCorpus:
    """Three splits of sentence pairs, ``sources[split][i]`` -> ``targets[split][i]`` (``src_lang`` ->
    ``tgt_lang``). ``facts``: what ``describe()`` adds (pairs per catalog, filter counts, layout...)."""

    name: str
    sources: dict[str, list[str]]
    targets: dict[str, list[str]]
    src_lang: str
    tgt_lang: str
    source: str
    licence: str
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for split in SPLITS:
            if len(self.sources[split]) != len(self.targets[split]):
                raise ValueError(f"{split}: {len(self.sources[split])} sources but {len(self.targets[split])} targets")

    @cached_property
    def pairs(self) -> dict[str, int]:
        return {split: len(self.sources[split]) for split in SPLITS}

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for split in SPLITS:
            for source, target in zip(self.sources[split], self.targets[split]):
                digest.update(f"{source}\t{target}\n".encode("utf-8"))
        return digest.hexdigest()

    @property
    def corpus_id(self) -> str:
        """``<name>-<first 16 hex digits of sha256>``: the corpus's name in the data cache."""
        return f"{self.name}-{self.sha256[:16]}"

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.name, "source": self.source, "licence": self.licence,
                "languages": f"{self.src_lang}-{self.tgt_lang}", **self.facts, "pairs": self.pairs,
                "sha256": self.sha256}


def read_lines(path: Path, *, what: str) -> list[str]:
    """The lines of the UTF-8 file ``path``, split at ``"\\n"`` only (WMT text holds other Unicode line
    breaks inside sentences), a trailing ``"\\r"`` removed; a last line without ``"\\n"`` counts."""
    lines = read_utf8(path, what=what).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel_split(directory: Path, split: str, src_lang: str, tgt_lang: str, *, what: str,
                        how_to_get: str) -> tuple[list[str], list[str]]:
    """``<split>.<src_lang>`` and ``<split>.<tgt_lang>`` under ``directory``, line i of one the
    translation of line i of the other; ``ConfigError`` when their line counts differ."""
    paths = [directory / f"{split}.{lang}" for lang in (src_lang, tgt_lang)]
    sources, targets = (read_lines(path, what=what) for path in paths)
    if len(sources) != len(targets):
        raise ConfigError(
            f"{paths[0]} has {len(sources):,} lines but {paths[1]} has {len(targets):,}: expected one sentence per "
            f"line in both, line i of one the translation of line i of the other. {how_to_get}")
    return sources, targets


WMT_HOW_TO_GET = (
    "Make them with fairseq's examples/translation/prepare-wmt14en2de.sh (its raw text before BPE: one "
    "sentence per line, train/valid/test = the training corpora, a dev set and newstest2014), or any script "
    "that writes one sentence per line. Nothing is downloaded by the suite.")


def wmt_corpus(root: str | Path, src_lang: str = "en", tgt_lang: str = "de") -> ParallelCorpus:
    """Raw parallel text in the layout fairseq's prepare scripts write (WMT14/WMT17 En-De)::

        root/train.en  root/train.de  root/valid.en  root/valid.de  root/test.en  root/test.de

    one sentence per line, UTF-8; ``src_lang``/``tgt_lang`` name the file suffixes (de -> en reads the
    same files the other way round). Read and hashed every run (seconds for WMT14's 4.5M pairs).
    """
    root = Path(root)
    expected = [f"{split}.{lang}" for split in SPLITS for lang in (src_lang, tgt_lang)]
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        seen = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else None
        raise ConfigError(
            f"WMT data under data.root={root} is incomplete: expected {', '.join(expected)}; missing "
            f"{', '.join(missing)} (found {seen if seen else 'an empty dir' if seen is not None else 'no such dir'}). "
            f"{WMT_HOW_TO_GET}")
    sources, targets = {}, {}
    for split in SPLITS:
        sources[split], targets[split] = read_parallel_split(root, split, src_lang, tgt_lang, what="WMT file",
                                                             how_to_get=WMT_HOW_TO_GET)
        if not sources[split]:
            raise ConfigError(f"{root / f'{split}.{src_lang}'} is empty. Expected the {split} split's sentences, one "
                              f"per line. {WMT_HOW_TO_GET}")
    return ParallelCorpus(name="wmt", sources=sources, targets=targets, src_lang=src_lang, tgt_lang=tgt_lang,
                          licence="the WMT shared task's: research use, per-corpus terms listed at statmt.org",
                          source=f"raw parallel text {{train,valid,test}}.{{{src_lang},{tgt_lang}}} under {root}",
                          facts={"root": str(root)})


# --- gettext catalogs --------------------------------------------------------------------------

GETTEXT_LOCALE_DIR = "/usr/share/locale"
GETTEXT_MIN_PAIRS = 5000
MIN_SOURCE_WORDS = 3  # "Cancel", "Open file": labels, not sentences
MAX_WORDS = 50  # --help texts collapse into paragraphs of hundreds of words (0.5% of the pairs are longer)
COPY_FRACTION = 0.5  # more than this share of the target's words also in the source: a copy
# Format placeholders, in source or target: printf (%s %d %1$s %-10lu %.*s %%), Python %(name)s,
# <inttypes.h> %<PRIu64>, Qt %1, strftime %H %Z %:z, Ruby %{name}, brace {0} {} {name} {0:>5}, shell
# ${VAR} $VAR $1. A space is no printf flag here, so "50% sure" is prose.
PLACEHOLDER = re.compile(r"""
      %(?:\d+\$)?[-+#0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?(?:hh|h|ll|l|L|q|j|z|Z|t)?[diouxXeEfFgGaAcCsSpnm%]
    | %\(\w+\)[-+#0 ]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa%]
    | %<\w+> | %\d+\b | %[:_^#-]*[A-Za-z] | %\{\w+\}
    | \{\d*(?:[:!][^{}\s]*)?\} | \{[A-Za-z_]\w*(?:\.\w+)*(?:[:!][^{}\s]*)?\}
    | \$\{[^}]*\} | \$[A-Za-z_]\w* | \$\d
""", re.VERBOSE)
WORD = re.compile(r"\w+")
# The rules a catalog entry is dropped by, counted in this order (an entry counts under the first it fails).
GETTEXT_FILTERS = ("plural_form", "short_source", "untranslated", "placeholder", "copy", "long", "duplicate")
GETTEXT_RULES = repr((PLACEHOLDER.pattern, WORD.pattern, MIN_SOURCE_WORDS, MAX_WORDS, COPY_FRACTION, GETTEXT_FILTERS,
                      [hash_split(f"sentence {i}") for i in range(64)]))  # in the cache key: a change re-prepares
GETTEXT_LICENCE = ("each catalog's package's own (GPL, LGPL, PostgreSQL, ...; see /usr/share/doc/<package>/"
                   "copyright)")


def gettext_catalog_dir(locale_dir: str | Path, language: str) -> Path:
    return Path(locale_dir) / language / "LC_MESSAGES"


def catalog_entries(path: Path) -> tuple[list[tuple[str, str]], int, str]:
    """``(pairs, plural forms skipped, charset)`` of the compiled catalog ``path``, read with
    ``gettext.GNUTranslations`` (which decodes msgids and msgstrs with the catalog's declared
    charset). Plural entries keep form 0 (German's singular), the others are counted; a msgctxt
    (``context\\x04msgid``) is stripped; runs of whitespace become one space. The header entry is
    no pair. Raises what the parser raises on a catalog it cannot read."""
    with path.open("rb") as handle:
        translations = gettext.GNUTranslations(handle)
    pairs, plural_skipped = [], 0
    for key, value in translations._catalog.items():
        if isinstance(key, tuple):
            key, form = key
            if form != 0:
                plural_skipped += 1
                continue
        if key == "":
            continue
        pairs.append((" ".join(key.split("\x04", 1)[-1].split()), " ".join(value.split())))
    return pairs, plural_skipped, translations.charset() or "ascii"


def gettext_rule(source: str, target: str) -> str | None:
    """The first filter (of ``GETTEXT_FILTERS``, but plural_form and duplicate) the pair fails, or None.

    short_source: fewer than 3 words (whitespace-separated) in the source; untranslated: the target
    is empty or the source; placeholder: a format placeholder (``PLACEHOLDER``) on either side; copy:
    more than half of the target's words (``\\w+``, case-sensitive, with repeats) occur in the source,
    or it has none (names, commands and option lists come through nearly unchanged); long: more than
    50 words on either side."""
    if len(source.split()) < MIN_SOURCE_WORDS:
        return "short_source"
    if not target or target == source:
        return "untranslated"
    if PLACEHOLDER.search(source) or PLACEHOLDER.search(target):
        return "placeholder"
    target_words, source_words = WORD.findall(target), set(WORD.findall(source))
    if not target_words or sum(w in source_words for w in target_words) > COPY_FRACTION * len(target_words):
        return "copy"
    if max(len(source.split()), len(target.split())) > MAX_WORDS:
        return "long"
    return None


def gettext_inputs_sha256(catalogs: Sequence[Path], language: str) -> str:
    """What the prepared corpus is a function of: the catalogs' names and bytes, the language, the rules."""
    digest = hashlib.sha256(f"{language}\0{GETTEXT_RULES}\0".encode())
    for path in catalogs:
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\0".encode())
    return digest.hexdigest()


def read_gettext_pairs(catalogs: Sequence[Path]) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
    """English -> catalog-language pairs of ``catalogs``, filtered and split; and the manifest's counts.

    Catalogs are read in name order, each one's entries in (source, target) order; a source seen
    before keeps its first pair (``duplicate``). A catalog the parser cannot read (not a .mo file,
    a charset Python does not know, bytes its charset cannot decode; Python decodes the header
    lines as UTF-8 before it knows the charset, so a Latin-1 header with a non-ASCII translator
    name fails) is skipped and recorded with the reason; catalogs in other charsets than UTF-8 are
    decoded with their charset and recorded. Split: ``hash_split`` of the source sentence (5%
    valid, 5% test), so a sentence keeps its split whatever else is installed."""
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    filters = Counter({rule: 0 for rule in GETTEXT_FILTERS})
    kept, entries, skipped, charsets = {}, {}, {}, {}
    seen: set[str] = set()
    for path in catalogs:
        try:
            pairs, plural_skipped, charset = catalog_entries(path)
        except (OSError, ValueError, LookupError, struct.error, IndexError) as error:
            skipped[path.name] = f"{type(error).__name__}: {error}"
            continue
        if charset.lower().replace("-", "") != "utf8":
            charsets[path.name] = charset
        filters["plural_form"] += plural_skipped
        entries[path.name], kept[path.name] = len(pairs) + plural_skipped, 0
        for source, target in sorted(pairs):
            rule = gettext_rule(source, target) or ("duplicate" if source in seen else None)
            if rule:
                filters[rule] += 1
                continue
            seen.add(source)
            kept[path.name] += 1
            splits[hash_split(source)].append((source, target))
    facts = {"catalogs_read": len(entries), "catalog_entries": entries, "pairs_per_catalog": kept,
             "filters": dict(filters), "skipped_catalogs": skipped, "non_utf8_catalogs": charsets}
    return splits, facts


def prepared_dir(catalog_dir: Path, language: str) -> tuple[Path, list[Path]]:
    """The prepared corpus's cache dir for ``catalog_dir``'s catalogs, and the catalogs."""
    catalogs = sorted(catalog_dir.glob("*.mo")) if catalog_dir.is_dir() else []
    inputs = gettext_inputs_sha256(catalogs, language)
    return data_cache_dir() / "translation" / f"gettext_{language}-{inputs[:16]}", catalogs


def prepare_gettext(locale_dir: str | Path = GETTEXT_LOCALE_DIR, language: str = "de") -> Path:
    """The prepared corpus's dir in the cache, made now unless there: ``{split}.en``,
    ``{split}.<language>`` and ``manifest.json`` (counts per catalog and filter, the corpus
    sha256), each written atomically, the manifest last; the same bytes on every machine with the
    same catalogs."""
    directory, catalogs = prepared_dir(gettext_catalog_dir(locale_dir, language), language)
    if (directory / "manifest.json").is_file():
        return directory
    splits, facts = read_gettext_pairs(catalogs)
    corpus = ParallelCorpus(name=f"gettext_{language}", sources={s: [p[0] for p in splits[s]] for s in SPLITS},
                            targets={s: [p[1] for p in splits[s]] for s in SPLITS}, src_lang="en",
                            tgt_lang=language, source="", licence="")
    for split in SPLITS:
        for lang, sentences in (("en", corpus.sources[split]), (language, corpus.targets[split])):
            write_atomically(directory / f"{split}.{lang}", "".join(f"{s}\n" for s in sentences).encode("utf-8"))
    manifest = {"corpus": corpus.name, "language": language, "pairs": corpus.pairs, "sha256": corpus.sha256, **facts}
    write_atomically(directory / "manifest.json",
                     (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    return directory


def too_few_pairs_message(found: int, minimum: int, catalog_dir: Path, facts: dict[str, Any]) -> str:
    read, skipped = facts.get("catalogs_read", 0), facts.get("skipped_catalogs", {})
    return (
        f"Only {found:,} usable English->{catalog_dir.parent.name} sentence pairs in the gettext catalogs "
        f"{catalog_dir}/*.mo ({read} catalogs read" + (f", {len(skipped)} skipped: {', '.join(skipped)}" if skipped
                                                        else "") + f"); data.min_pairs={minimum} are needed. "
        "The catalogs come with the installed packages: on Debian/Ubuntu `apt-get install -y gcc-12-locales` adds "
        "the compiler's (a Debian 12 base image goes from 34k to 49k raw pairs of >= 3 words), and every installed "
        "package's language files add more. Minimised images drop /usr/share/locale through a path-exclude line in "
        "/etc/dpkg/dpkg.cfg.d/: remove it and reinstall the packages. Or lower data.min_pairs, use another "
        "data.language, data=wmt data.root=..., or data=synthetic_translation.")


def gettext_corpus(locale_dir: str | Path = GETTEXT_LOCALE_DIR, language: str = "de", *,
                   min_pairs: int = GETTEXT_MIN_PAIRS) -> ParallelCorpus:
    """English -> ``language`` sentence pairs from the system's compiled gettext catalogs,
    ``<locale_dir>/<language>/LC_MESSAGES/*.mo`` (``read_gettext_pairs``: plural form 0, msgctxt
    stripped, filtered, split by a hash of the source), prepared once into the cache
    (``prepare_gettext``) and read back; ``ConfigError`` below ``min_pairs`` pairs."""
    catalog_dir = gettext_catalog_dir(locale_dir, language)
    if not any(catalog_dir.glob("*.mo")):  # nothing to prepare (and no empty corpus in the cache)
        raise ConfigError(too_few_pairs_message(0, min_pairs, catalog_dir, {}))
    directory = prepare_gettext(locale_dir, language)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        sources, targets = {}, {}
        for split in SPLITS:
            sources[split], targets[split] = read_parallel_split(
                directory, split, "en", language, what="prepared corpus file", how_to_get=f"Delete {directory}: it "
                "is prepared again on first use.")
    except (ValueError, ConfigError) as error:
        raise ConfigError(f"The prepared corpus {directory} is damaged ({error}). Delete the dir: it is prepared "
                          "again on first use.") from error
    facts = {key: manifest[key] for key in ("catalogs_read", "pairs_per_catalog", "filters", "skipped_catalogs",
                                            "non_utf8_catalogs")}
    corpus = ParallelCorpus(
        name=f"gettext_{language}", sources=sources, targets=targets, src_lang="en", tgt_lang=language,
        source=f"the gettext message catalogs {catalog_dir}/*.mo (English msgid -> {language} msgstr)",
        licence=GETTEXT_LICENCE, facts={"locale_dir": str(locale_dir), "prepared": str(directory), **facts})
    if corpus.sha256 != manifest["sha256"]:
        raise ConfigError(f"The prepared corpus {directory} does not match its manifest (sha256 "
                          f"{corpus.sha256[:16]}..., manifest {manifest['sha256'][:16]}...). Delete the dir: it is "
                          "prepared again on first use.")
    found = sum(corpus.pairs.values())
    if found < min_pairs:
        raise ConfigError(too_few_pairs_message(found, min_pairs, catalog_dir, facts))
    return corpus


# --- a synthetic task ----------------------------------------------------------------------------

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def synthetic_vocabularies(words: int, task_seed: int = 0) -> tuple[list[str], list[str]]:
    """``words`` distinct lower-case source words and as many capitalised target words, pseudo-words of
    two syllables drawn from ``task_seed``; source word i translates to target word i."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    every = [a + b for a in syllables for b in syllables]
    chosen = np.random.default_rng(task_seed).choice(len(every), 2 * words, replace=False)
    return [every[i] for i in chosen[:words]], [every[i].capitalize() for i in chosen[words:]]


def synthetic_translate(sentence: str, mapping: dict[str, str]) -> str:
    """The synthetic task's translation: each word mapped, then adjacent words swapped in pairs
    (positions 0<->1, 2<->3, ...; an odd last word stays)."""
    words = [mapping[w] for w in sentence.split()]
    for i in range(0, len(words) - 1, 2):
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def synthetic_corpus(*, train_pairs: int = 2000, valid_pairs: int = 200, test_pairs: int = 200, words: int = 24,
                     min_words: int = 3, max_words: int = 12, data_seed: int = 0) -> ParallelCorpus:
    """A deterministic toy translation task for fast tests: sources are ``min_words``..``max_words``
    words drawn uniformly from ``words`` pseudo-words (split i's sentences from
    ``numpy.random.default_rng([data_seed, i])``), targets ``synthetic_translate`` of them. The
    vocabularies and their mapping are fixed (task seed 0), whatever ``data_seed``."""
    sizes = {"train": train_pairs, "valid": valid_pairs, "test": test_pairs}
    for key, value, smallest in (("train_pairs", train_pairs, 1), ("valid_pairs", valid_pairs, 1),
                                 ("test_pairs", test_pairs, 1), ("words", words, 2), ("min_words", min_words, 1),
                                 ("max_words", max_words, 1), ("data_seed", data_seed, 0)):
        if not (is_whole(value) and value >= smallest):
            raise ConfigError(f"data.{key} must be a whole number >= {smallest}; found {value!r}. Set it accordingly.")
    if min_words > max_words or words > 2500:
        raise ConfigError(f"data.min_words <= data.max_words and data.words <= 2500 (pseudo-words there are) are "
                          f"needed; found min_words={min_words}, max_words={max_words}, words={words}. Set them so.")
    source_words, target_words = synthetic_vocabularies(words)
    mapping = dict(zip(source_words, target_words))
    sources, targets = {}, {}
    for index, split in enumerate(SPLITS):
        rng = np.random.default_rng([data_seed, index])
        lengths = rng.integers(min_words, max_words + 1, sizes[split])
        sources[split] = [" ".join(source_words[i] for i in rng.integers(0, words, n)) for n in lengths]
        targets[split] = [synthetic_translate(s, mapping) for s in sources[split]]
    return ParallelCorpus(
        name="synthetic_translation", sources=sources, targets=targets, src_lang="src", tgt_lang="tgt",
        source=f"generated: {words} pseudo-words mapped one to one, adjacent words swapped (data_seed {data_seed})",
        licence="none needed (generated)", facts={"words": words, "sentence_words": [min_words, max_words]})


# --- sacrebleu's named test sets, offline ---------------------------------------------------------

SACREBLEU_FIELDS = ("src", "ref", "docid", "genre", "origlang")


def sacrebleu_dir() -> Path:
    """Where sacrebleu keeps its test sets: ``$SACREBLEU``, default ``~/.sacrebleu`` (as sacrebleu)."""
    return Path(os.environ.get("SACREBLEU") or Path.home() / ".sacrebleu")


def check_test_set_name(name: Any) -> None:
    """``ConfigError`` unless ``name`` looks like a sacrebleu test set name (wmt14, wmt21/systems, ...)."""
    segment = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
    if not isinstance(name, str) or not re.fullmatch(f"{segment}(/{segment})?", name):
        raise ConfigError(f"data.test_set must be null (the corpus's own test split) or the name of a sacrebleu test "
                          f"set such as wmt14 or wmt17; found {name!r}.")


def sacrebleu_test_set(name: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str], Path]:
    """``(sources, references, dir)`` of sacrebleu's test set ``name`` (wmt14, wmt17, ...) for
    ``src_lang-tgt_lang``, read offline from the processed files sacrebleu writes, which must all be
    there (with any missing, sacrebleu itself would download)::

        $SACREBLEU/<name>/<name>.<src>-<tgt>.{src,ref,docid,genre,origlang}

    Lines stripped, as sacrebleu's ``source()``/``references()`` give them."""
    check_test_set_name(name)
    directory = sacrebleu_dir() / name
    files = {f: directory / f"{name.replace('/', '_')}.{src_lang}-{tgt_lang}.{f}" for f in SACREBLEU_FIELDS}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise ConfigError(
            f"data.test_set={name} is read offline from sacrebleu's processed files; expected all five of "
            f"{', '.join(p.name for p in files.values())} in {directory} (SACREBLEU="
            f"{os.environ.get('SACREBLEU') or 'unset: ~/.sacrebleu'}); missing {', '.join(missing)}. On a machine "
            f"with internet, `SACREBLEU=/tmp/sb sacrebleu -t {name} -l {src_lang}-{tgt_lang} --echo src > /dev/null` "
            f"writes them into /tmp/sb/{name}/; copy that dir to {directory}, or set SACREBLEU to the dir holding "
            f"{name}/. Or set data.test_set=null for the corpus's own test split.")
    sources, references = (
        [line.strip() for line in read_lines(files[f], what="sacrebleu test set file")] for f in ("src", "ref"))
    if len(sources) != len(references) or not sources:
        raise ConfigError(f"{files['src']} has {len(sources):,} lines and {files['ref']} {len(references):,}: expected "
                          "the same number, at least one. Write the files again with sacrebleu.")
    return sources, references, directory


# --- encoded sentences and batches -----------------------------------------------------------------

ENCODE_CHUNK = 100_000  # sentences sentencepiece encodes per call


@dataclass(frozen=True)
class EncodedSentences:
    """Sentences as one array of token ids (``ids[offsets[i]:offsets[i + 1]]`` is sentence i, without
    bos/eos) and ``offsets`` (n + 1,)."""

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index]:self.offsets[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_sentences(tokenizer: SentencePieceTokenizer, sentences: Sequence[str]) -> EncodedSentences:
    """Each sentence's ids, as ``tokenizer.encode(sentence)`` gives them, encoded in batches."""
    chunks = [tokenizer.processor.encode(list(sentences[i:i + ENCODE_CHUNK]))
              for i in range(0, len(sentences), ENCODE_CHUNK)]
    lengths = np.fromiter((len(ids) for chunk in chunks for ids in chunk), dtype=np.int64, count=len(sentences))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(chunks)),
                      dtype=id_dtype(tokenizer.vocab_size), count=int(offsets[-1]))
    return EncodedSentences(ids, offsets)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomically(path, buffer.getvalue())


def encode_corpus(corpus: ParallelCorpus, tokenizer: SentencePieceTokenizer
                  ) -> dict[str, tuple[EncodedSentences, EncodedSentences]]:
    """Every split's (sources, targets) encoded, cached under ``<cache>/tokens/<corpus id>/
    sentencepiece-<model sha256[:16]>/{split}.{lang}.{ids,offsets}.npy`` and read back (ids memory-mapped)."""
    directory = data_cache_dir() / "tokens" / corpus.corpus_id / (
        f"sentencepiece-{tokenizer.describe()['tokenizer_sha256'][:16]}")
    encoded = {}
    for split in SPLITS:
        sides = []
        for lang, sentences in ((corpus.src_lang, corpus.sources[split]), (corpus.tgt_lang, corpus.targets[split])):
            ids_path, offsets_path = (directory / f"{split}.{lang}.{part}.npy" for part in ("ids", "offsets"))
            if not (ids_path.is_file() and offsets_path.is_file()):
                fresh = encode_sentences(tokenizer, sentences)
                _save_npy(offsets_path, fresh.offsets)
                _save_npy(ids_path, fresh.ids)
            try:
                side = EncodedSentences(np.load(ids_path, mmap_mode="r", allow_pickle=False),
                                        np.load(offsets_path, allow_pickle=False))
            except (ValueError, OSError) as error:
                raise ConfigError(f"{ids_path} or {offsets_path} is not an encoded split ({error}). Delete {directory}:"
                                  " it is made again on first use.") from error
            if len(side) != len(sentences) or side.offsets[-1] != len(side.ids):
                raise ConfigError(f"{ids_path} does not hold the {len(sentences)} sentences of {corpus.corpus_id}'s "
                                  f"{split}.{lang}. Delete {directory}: it is made again on first use.")
            sides.append(side)
        encoded[split] = (sides[0], sides[1])
    return encoded


def learn_tokenizer(corpus: ParallelCorpus, vocab_size: int) -> SentencePieceTokenizer:
    """The corpus's joint sentencepiece model, from both sides of its training split (cached by name,
    ``<corpus id>-bpe<vocab_size>``)."""
    training_texts = ["".join(f"{s}\n" for s in corpus.sources["train"]),
                      "".join(f"{t}\n" for t in corpus.targets["train"])]
    return build_tokenizer("sentencepiece", corpus_id=corpus.corpus_id, training_texts=training_texts,
                           vocab_size=vocab_size)


class TranslationPairs(Dataset):
    """Item ``i``: ``(source ids, target ids, index)`` of pair ``indices[i]`` of a split."""

    def __init__(self, sources: EncodedSentences, targets: EncodedSentences, indices: np.ndarray | None = None):
        self.sources, self.targets = sources, targets
        self.indices = np.arange(len(sources)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        index = int(self.indices[i])
        return self.sources[index], self.targets[index], index


class LengthGroupedSampler(ResumableSampler):
    """A ``ResumableSampler`` whose batches hold pairs of similar length (fairseq batches by length too).

    An epoch's keys (this rank's shard of the ``(seed, epoch)`` permutation; with ``per_epoch``, its
    first ``per_epoch // num_replicas`` as ``sampling.EpochPrefixSampler``) are cut into groups of
    ``group_batches · batch_size``; each group is sorted by length (the longer side of the pair,
    stable), cut into batches of ``batch_size``, and the batches of the epoch are shuffled by a
    generator of ``(seed, epoch)``; an incomplete last batch stays last, where ``drop_last`` drops
    it. Padding falls from about 4x the real tokens (random batches of the gettext pairs) to a few
    percent. The order is a function of ``(seed, epoch, rank)`` alone, so a resumed epoch skips its
    first batches exactly (``ResumableDataLoader`` sets ``start``).
    """

    def __init__(self, lengths: np.ndarray, *, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 per_epoch: int | None = None, group_batches: int = 32):
        super().__init__(len(lengths), seed=seed, num_replicas=num_replicas, rank=rank)
        if per_epoch is not None:
            self.num_samples = min(self.num_samples, per_epoch // num_replicas)
        self.lengths, self.batch_size, self.group = lengths, batch_size, group_batches * batch_size

    def epoch_keys(self) -> list[tuple[int, int]]:
        keys = super().epoch_keys()[: self.num_samples]
        batches = []
        for start in range(0, len(keys), self.group):
            group = sorted(keys[start:start + self.group], key=lambda key: self.lengths[key[0]])
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7)
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [key for i in order for key in batches[i]] + [key for batch in tail for key in batch]


def _by_length(pairs: TranslationPairs) -> list[int]:
    """Items of ``pairs`` by the length of the longer side, shortest first (ties by index): a fixed order."""
    lengths = np.maximum(pairs.sources.lengths[pairs.indices], pairs.targets.lengths[pairs.indices])
    return np.argsort(lengths, kind="stable").tolist()


def _padded(rows: list[list[int]]) -> torch.Tensor:
    batch = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return batch


def collate_pairs(items: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """``{"src": ids + eos, "tgt_in": bos + ids, "tgt_out": ids + eos, "index"}``, padded with 0 on the right."""
    sources, targets = [s.tolist() for s, _, _ in items], [t.tolist() for _, t, _ in items]
    return {"src": _padded([s + [EOS_ID] for s in sources]),
            "tgt_in": _padded([[BOS_ID] + t for t in targets]),
            "tgt_out": _padded([t + [EOS_ID] for t in targets]),
            "index": torch.tensor([index for _, _, index in items], dtype=torch.long)}


# --- the DataModules ---------------------------------------------------------------------------


class TranslationDataModule(StabilityDataModule):
    """What every translation DataModule shares; a subclass names its corpus reader (``read_corpus``).

    Options (checked before the corpus is read): ``vocab_size`` (sentencepiece pieces, >= 262),
    ``batch_size`` (sentence pairs per device and step), ``num_workers``, ``seed`` (training order),
    ``max_len`` (tokens: longer training pairs are dropped), ``bleu_sentences`` (validation BLEU on
    that many of the validated pairs, evenly spaced; null: all), ``test_set`` (null: the corpus's test
    split; a sacrebleu test set name, read offline from $SACREBLEU), ``pairs_per_epoch`` (an epoch is
    that many training pairs, the first of the epoch's permutation of all of them, as the LM's
    ``blocks_per_epoch``; null: every pair once), ``val_pairs`` (validation loss on that many valid
    pairs, evenly spaced; null: all).
    """

    def __init__(self, *, read_corpus: Callable[[], ParallelCorpus], vocab_size: int, batch_size: int,
                 num_workers: int, seed: int, max_len: int, bleu_sentences: int | None, test_set: str | None,
                 pairs_per_epoch: int | None = None, val_pairs: int | None = None):
        super().__init__()
        for key, value in (("pairs_per_epoch", pairs_per_epoch), ("val_pairs", val_pairs)):
            if value is not None and not (is_whole(value) and value >= 1):
                raise ConfigError(f"data.{key} must be a whole number >= 1 or null (all pairs); found {value!r}. "
                                  f"Set data.{key} accordingly.")
        for key, value, smallest in (("vocab_size", vocab_size, SentencePieceTokenizer.MIN_VOCAB),
                                     ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("seed", seed, 0), ("max_len", max_len, 2), ("bleu_sentences", bleu_sentences, 1)):
            if not (is_whole(value) and value >= smallest) and not (value is None and key == "bleu_sentences"):
                meaning = {"vocab_size": " (sentencepiece pieces: the 4 specials, the 256 byte pieces, a newline "
                                         "and learnt ones)", "max_len": " (tokens of a sentence with its eos or bos)",
                           "bleu_sentences": " (or null: all)"}.get(key, "")
                raise ConfigError(f"data.{key} must be a whole number >= {smallest}{meaning}; found {value!r}. "
                                  f"Set data.{key} accordingly.")
        if test_set is not None:
            check_test_set_name(test_set)
        corpus = read_corpus()
        named = sacrebleu_test_set(test_set, corpus.src_lang, corpus.tgt_lang) if test_set is not None else None
        self.tokenizer = learn_tokenizer(corpus, vocab_size)
        encoded = encode_corpus(corpus, self.tokenizer)
        train_sources, train_targets = encoded["train"]
        fits = (train_sources.lengths + 1 <= max_len) & (train_targets.lengths + 1 <= max_len)
        if fits.sum() < batch_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is more than the {int(fits.sum()):,} training pairs of {corpus.name} "
                f"that fit data.max_len={max_len} tokens (of {corpus.pairs['train']:,}). Lower data.batch_size or "
                "raise data.max_len.")
        self.train_set = TranslationPairs(train_sources, train_targets, np.flatnonzero(fits))
        if pairs_per_epoch is not None and not batch_size <= pairs_per_epoch <= len(self.train_set):
            raise ConfigError(f"data.pairs_per_epoch must be from data.batch_size={batch_size} to the "
                              f"{len(self.train_set):,} training pairs of {corpus.name}, or null for all of them; "
                              f"found {pairs_per_epoch}. Set it in that range.")
        self.pairs_per_epoch = pairs_per_epoch
        valid_sources, valid_targets = encoded["valid"]
        self.val_set = TranslationPairs(valid_sources, valid_targets, evenly_spaced(len(valid_sources), val_pairs))
        self.text = {"valid": (corpus.sources["valid"], corpus.targets["valid"])}  # the train text is not kept
        if named is None:
            self.test_set = TranslationPairs(*encoded["test"])
            self.text["test"] = (corpus.sources["test"], corpus.targets["test"])
        else:
            self.test_set = TranslationPairs(encode_sentences(self.tokenizer, named[0]),
                                             encode_sentences(self.tokenizer, named[1]))
            self.text["test"] = (named[0], named[1])
        self.batch_size, self.num_workers, self.seed, self.max_len = batch_size, num_workers, seed, max_len
        self.bleu_sentences = bleu_sentences
        longest = 1 + max(int(side.lengths[pairs.indices].max(initial=0))  # + eos (src, tgt_out) or bos (tgt_in)
                          for pairs in (self.train_set, self.val_set, self.test_set)
                          for side in (pairs.sources, pairs.targets))
        self.max_positions = 2 * longest + 16
        self._description = {
            **corpus.describe(), **self.tokenizer.describe(),
            "tokens": {split: {"source": int(encoded[split][0].lengths.sum()),
                               "target": int(encoded[split][1].lengths.sum())} for split in SPLITS},
            "max_len": max_len, "train_pairs_used": len(self.train_set),
            "train_pairs_too_long": corpus.pairs["train"] - len(self.train_set),
            "test_set": test_set or "the corpus's test split", "test_pairs": len(self.test_set),
            "test_set_dir": str(named[2]) if named else None,
            "bleu_sentences": len(self.bleu_indices("valid")), "max_positions": self.max_positions,
            "pairs_per_epoch": pairs_per_epoch or len(self.train_set), "val_pairs": len(self.val_set),
        }

    # what the data fixes for the model and task
    @property
    def model_kwargs(self) -> dict[str, int]:
        return {"vocab_size": self.tokenizer.vocab_size, "pad_id": PAD_ID, "max_positions": self.max_positions}

    @property
    def task_kwargs(self) -> dict[str, int]:
        return {"pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}

    def describe(self) -> dict[str, Any]:
        return self._description

    # text access for BLEU and `sigma-repro translate` (the task never reads files)
    def _split_text(self, split: str) -> tuple[list[str], list[str]]:
        if split not in self.text:
            raise ConfigError(f"split must be 'valid' or 'test'; found {split!r}.")
        return self.text[split]

    def sources(self, split: str) -> list[str]:
        """The raw source sentences of ``split`` ("valid" | "test"); item i is batch index i."""
        return self._split_text(split)[0]

    def references(self, split: str) -> list[str]:
        """The raw target sentences of ``split`` ("valid" | "test"), what BLEU scores against."""
        return self._split_text(split)[1]

    def bleu_indices(self, split: str) -> list[int]:
        """The pairs BLEU is computed on: valid, ``bleu_sentences`` of the validated pairs evenly spaced
        (null: all of them); test, all."""
        if split == "valid":
            validated = self.val_set.indices
            return validated[evenly_spaced(len(validated), self.bleu_sentences)].tolist()
        return list(range(len(self._split_text(split)[0])))

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Detokenised text of token ids (pad, bos and eos decode to nothing)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tokenizer.decode(ids)

    def encode_source(self, text: str) -> list[int]:
        """Source ids + eos of ``text`` (leading and trailing whitespace removed), as ``src`` holds them."""
        return self.tokenizer.encode(text.strip()).tolist() + [EOS_ID]

    # loaders
    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer  # None outside Lightning: one process, epochs from loader.sampler.set_epoch
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        pairs = self.train_set
        lengths = np.maximum(pairs.sources.lengths[pairs.indices], pairs.targets.lengths[pairs.indices])
        sampler = LengthGroupedSampler(lengths, batch_size=self.batch_size, seed=self.seed, num_replicas=world_size,
                                       rank=rank, per_epoch=self.pairs_per_epoch)
        if len(sampler) < self.batch_size:
            raise ConfigError(f"Each of the {world_size} devices gets {len(sampler)} training pairs an epoch, fewer "
                              f"than data.batch_size={self.batch_size} (a per-device batch). Lower data.batch_size"
                              f" (or raise data.pairs_per_epoch).")
        return ResumableDataLoader(SeededView(self.train_set), sampler=sampler, drop_last=True, trainer=trainer,
                                   **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        """The validated pairs (``val_pairs`` of the valid split, or all), shortest first (little padding;
        a batch's ``index`` says which pairs it holds)."""
        return DataLoader(self.val_set, sampler=_by_length(self.val_set), **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        """Every test pair (the corpus's test split, or ``test_set``), shortest first."""
        return DataLoader(self.test_set, sampler=_by_length(self.test_set), **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_workers": self.num_workers, "collate_fn": collate_pairs,
                "persistent_workers": self.num_workers > 0, "pin_memory": torch.cuda.is_available(),
                "generator": torch.Generator().manual_seed(self.seed)}

    def probe_batch(self, n: int) -> dict[str, torch.Tensor]:
        """``{"src", "tgt_in"}`` of ``n`` validated pairs evenly spaced over them; always the same."""
        if not is_whole(n) or not 1 <= n <= len(self.val_set):
            raise ConfigError(f"probe batch size must be between 1 and the {len(self.val_set)} validation pairs; "
                              f"found {n}. Set callbacks.diagnostics.probe_size lower.")
        batch = collate_pairs([self.val_set[i] for i in evenly_spaced(len(self.val_set), n).tolist()])
        return {"src": batch["src"], "tgt_in": batch["tgt_in"]}


class GettextDataModule(TranslationDataModule):
    """``data=gettext_de``: En->De pairs from the system's gettext catalogs (``gettext_corpus``)."""

    def __init__(self, *, locale_dir: str = GETTEXT_LOCALE_DIR, language: str = "de",
                 min_pairs: int = GETTEXT_MIN_PAIRS, vocab_size: int = GETTEXT_VOCAB, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, max_len: int = 128, bleu_sentences: int | None = 256,
                 test_set: str | None = None, pairs_per_epoch: int | None = None, val_pairs: int | None = None):
        if not isinstance(language, str) or not re.fullmatch(r"[A-Za-z]{2,3}(_[A-Za-z]{2})?(@\w+)?", language):
            raise ConfigError(f"data.language must be a locale name such as de, fr or pt_BR (a dir under "
                              f"data.locale_dir); found {language!r}.")
        if not (is_whole(min_pairs) and min_pairs >= 1):
            raise ConfigError(f"data.min_pairs must be a whole number >= 1; found {min_pairs!r}.")
        super().__init__(read_corpus=partial(gettext_corpus, locale_dir, language, min_pairs=min_pairs),
                         vocab_size=vocab_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         max_len=max_len, bleu_sentences=bleu_sentences, test_set=test_set,
                         pairs_per_epoch=pairs_per_epoch, val_pairs=val_pairs)


class WmtDataModule(TranslationDataModule):
    """``data=wmt data.root=...``: raw parallel text ``{train,valid,test}.{src_lang,tgt_lang}`` (``wmt_corpus``)."""

    def __init__(self, *, root: str, src_lang: str = "en", tgt_lang: str = "de", vocab_size: int = WMT_VOCAB,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0, max_len: int = 256,
                 bleu_sentences: int | None = None, test_set: str | None = None, pairs_per_epoch: int | None = None,
                 val_pairs: int | None = None):
        for key, value in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_-]{2,10}", value):
                raise ConfigError(f"data.{key} must be a language code, the suffix of the files (en, de, ...); "
                                  f"found {value!r}.")
        if src_lang == tgt_lang:
            raise ConfigError(f"data.src_lang and data.tgt_lang are both {src_lang!r}; expected two languages.")
        super().__init__(read_corpus=partial(wmt_corpus, root, src_lang, tgt_lang), vocab_size=vocab_size,
                         batch_size=batch_size, num_workers=num_workers, seed=seed, max_len=max_len,
                         bleu_sentences=bleu_sentences, test_set=test_set, pairs_per_epoch=pairs_per_epoch,
                         val_pairs=val_pairs)


class SyntheticTranslationDataModule(TranslationDataModule):
    """``data=synthetic_translation``: the generated toy task (``synthetic_corpus``), in memory."""

    def __init__(self, *, train_pairs: int = 2000, valid_pairs: int = 200, test_pairs: int = 200, words: int = 24,
                 min_words: int = 3, max_words: int = 12, data_seed: int = 0, vocab_size: int = SYNTHETIC_VOCAB,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0, max_len: int = 64,
                 bleu_sentences: int | None = None, test_set: str | None = None, pairs_per_epoch: int | None = None,
                 val_pairs: int | None = None):
        super().__init__(read_corpus=partial(synthetic_corpus, train_pairs=train_pairs, valid_pairs=valid_pairs,
                                             test_pairs=test_pairs, words=words, min_words=min_words,
                                             max_words=max_words, data_seed=data_seed),
                         vocab_size=vocab_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         max_len=max_len, bleu_sentences=bleu_sentences, test_set=test_set,
                         pairs_per_epoch=pairs_per_epoch, val_pairs=val_pairs)
