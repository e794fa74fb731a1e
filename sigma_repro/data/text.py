"""Text corpora and the causal language-model DataModules (``task=lm``), chosen with ``data=<name>``.

| ``data=``     | class                   | corpus                                             | tokenizer default |
|---------------|-------------------------|----------------------------------------------------|-------------------|
| ``stdlib``    | ``StdlibDataModule``    | the running CPython's standard library .py source  | bytes             |
| ``wikitext103``| ``WikiText103DataModule``| ``wiki.{train,valid,test}.tokens`` (or ``.raw``) | words             |
| ``text_files``| ``TextFilesDataModule`` | any UTF-8 text files the user names                | bytes             |

A corpus (``TextCorpus``) is three splits, ``train``, ``valid`` and ``test``, each a list of
documents (files); its text is read as UTF-8, and its hash (``sha256``: of the UTF-8 bytes of the
train, valid and test text, in that order, each split its documents joined) names it in the data
cache. The readers (``read_utf8``, ``hash_split``, ``stdlib_corpus``, ``wikitext103_corpus``,
``text_files_corpus``) know nothing of language modelling; the translation family reuses them.

A split is tokenized (``sigma_repro.data.tokenizers``) document by document into one stream of
ids, and the stream cut into blocks: block ``i`` is ``inputs = stream[s : s + T]``, ``targets =
stream[s + 1 : s + T + 1]`` with ``s = i * T``, ``T = block_size`` (the last token of a block is the
first of the next; the tail too short for a block is unused). Learnt tokenizers and the tokenized
streams (all but bytes, which are the text itself) are cached under ``data_cache_dir()`` keyed by the
corpus and tokenizer hashes: WikiText-103 is read and hashed each run (seconds), tokenized once.

Training order: ``blocks_per_epoch`` (null: every training block once an epoch) makes an epoch
that many blocks, the first of the epoch's permutation of all training blocks (a function of
``(seed, epoch)``, ``sigma_repro.data.sampling``), so epochs stay short on a large corpus and a
killed run resumes mid-epoch exactly. Validation and test use ``val_blocks`` blocks of their split
(null: all), evenly spaced over it and the same in every run; ``probe_batch(n)`` takes ``n`` of
those, evenly spaced. What the data fixes for the model and task (``sigma_repro.data.base``):
``model_kwargs = {"vocab_size", "max_seq_len"}`` and ``task_kwargs = {"bytes_per_token"}``, the
UTF-8 bytes per target token of the validation blocks (1.0 for bytes; None for words, whose decoding
loses text, so bits per byte would mean nothing).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sigma_repro.data.base import StabilityDataModule, evenly_spaced, is_whole
from sigma_repro.data.sampling import EpochPrefixSampler, ResumableDataLoader, ResumableSampler, SeededView
from sigma_repro.data.tokenizers import Tokenizer, build_tokenizer, check_tokenizer_options, data_cache_dir, \
    write_atomically
from sigma_repro.errors import ConfigError

SPLITS = ("train", "valid", "test")
VALID_FRACTION, TEST_FRACTION = 0.05, 0.05  # of the files (stdlib: by hash) or of each file (text_files)


# --- corpora -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextCorpus:
    """Three splits of documents. ``facts``: what ``describe()`` adds (interpreter version, layout...)."""

    name: str
    documents: dict[str, list[str]]
    source: str
    licence: str
    facts: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def bytes(self) -> dict[str, int]:
        return {split: sum(len(d.encode("utf-8")) for d in self.documents[split]) for split in SPLITS}

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for split in SPLITS:
            for document in self.documents[split]:
                digest.update(document.encode("utf-8"))
        return digest.hexdigest()

    @property
    def corpus_id(self) -> str:
        """``<name>-<first 16 hex digits of sha256>``: the corpus's name in the data cache."""
        return f"{self.name}-{self.sha256[:16]}"

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.name, "source": self.source, "licence": self.licence, **self.facts,
                "bytes": self.bytes, "sha256": self.sha256}


def read_utf8(path: Path, *, what: str = "text file") -> str:
    """The text of ``path``, which must be a UTF-8 file; ``ConfigError`` naming it otherwise."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found (or not a file). Expected a UTF-8 text file there; "
                          "check the path.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not UTF-8: byte {error.start} (0x{raw[error.start]:02x}) cannot be decoded. Expected "
            "UTF-8 text; convert it (e.g. iconv -f latin1 -t utf-8) or leave it out."
        ) from error


def hash_split(key: str, *, valid_fraction: float = VALID_FRACTION, test_fraction: float = TEST_FRACTION) -> str:
    """``"valid"``, ``"test"`` or ``"train"`` for a document named ``key`` (a relative path), from the
    first 8 bytes of its sha256 read as a fraction u in [0, 1): valid below ``valid_fraction``, test
    below ``valid_fraction + test_fraction``. The same name lands in the same split wherever it is
    listed, whatever other documents there are."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"


# Left out of the stdlib corpus (see stdlib_corpus for why): dir names anywhere in the tree, dirs
# directly under the stdlib dir, relative paths, and (in stdlib_files) config-3.x-<platform>/ and
# _sysconfigdata_*.py at the top.
STDLIB_EXCLUDED_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"}
STDLIB_EXCLUDED_TOP_DIRS = {"idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "lib-dynload",
                            "pydoc_data"}
STDLIB_EXCLUDED_PATHS = {"ctypes/macholib", "turtle.py", "site.py", "sysconfig.py", "sitecustomize.py",
                         "_distutils_system_mod.py"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """The corpus's files: every ``.py`` under ``root`` outside the exclusions above, as relative POSIX
    paths in code-point order (not the order the file system lists them in)."""
    files = []
    for directory, subdirs, names in os.walk(root):
        here = Path(directory).relative_to(root)
        top = here == Path(".")
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS
                      and not (top and (d in STDLIB_EXCLUDED_TOP_DIRS or d.startswith("config-")))
                      and (here / d).as_posix() not in STDLIB_EXCLUDED_PATHS]
        files += [(here / n).as_posix() for n in names if n.endswith(".py") and (here / n).as_posix()
                  not in STDLIB_EXCLUDED_PATHS and not (top and n.startswith("_sysconfigdata"))]
    return sorted(files)


def stdlib_corpus(root: str | Path | None = None) -> TextCorpus:
    """The standard library's own Python source: PSF-2.0 text that ships with every CPython.

    ``root`` null: the running interpreter's stdlib (``sysconfig``); a path: another stdlib tree.
    Files (``stdlib_files``) are split by ``hash_split`` of their relative path (about 5% valid, 5%
    test) and joined in path order within a split.

    Left out, so that every build of a Python version has the same file list (``STDLIB_EXCLUDED_*``):

    - ``__pycache__`` (bytecode), ``lib-dynload`` (extension modules), ``config-3.x-<platform>/`` and
      ``_sysconfigdata_*.py`` (the build's own paths and flags): not source, or different per build;
    - ``site-packages``, ``dist-packages``: third-party packages, different on every machine;
    - ``test``, ``tests``, ``idle_test`` dirs: test suites, which distributions ship as packages of
      their own (Debian libpython3.x-testsuite, Fedora python3-test);
    - ``idlelib``, ``tkinter``, ``turtledemo``, ``turtle.py``: the Tk parts, split out by distributions
      (Debian idle-python3.x and python3-tk; Fedora python3-idle and python3-tkinter, turtle.py in the latter);
    - ``lib2to3``, ``distutils`` (Debian python3-lib2to3, python3-distutils, the latter patched),
      ``ensurepip`` (Debian patches it and moves its wheels to python3.x-venv), ``ctypes/macholib``
      (macOS only; Debian removes it);
    - ``site.py``, ``sysconfig.py``: patched by Debian and Fedora for their install layouts;
      ``sitecustomize.py``, ``_distutils_system_mod.py``: Debian's own additions;
    - ``pydoc_data``: generated from the documentation, 0.76 MB of English prose in one dict, which
      would be a third of whichever split it fell in.

    The text is the same on every machine with the same CPython micro version and no distribution
    patches to the files kept; the run summary records the version and the sha256, which tell.
    Measured with CPython 3.11.7 (python.org source, built by pyenv): 503 files, 9,028,490 bytes;
    train 448 files, 8,164,763 bytes; valid 27, 407,954; test 28, 455,773; sha256
    ccc4168d5075fd26.... Debian's 3.11.2 (/usr/lib/python3.11): the same 503 file names, 9,010,668
    bytes (107 of the files differ between the two micro versions). Read in about 0.03 s.
    """
    path = stdlib_root() if root is None else Path(root)
    files = stdlib_files(path) if path.is_dir() else []
    if not files:
        raise ConfigError(f"No Python standard library source under {path}: expected .py files there"
                          + (" (the interpreter's sysconfig stdlib path; is this a Python build without its .py "
                             "files?)" if root is None else "; point data.root at a stdlib dir, or null for the "
                             "running interpreter's"))
    documents: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in files:
        documents[hash_split(name)].append(read_utf8(path / name, what="standard library file"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    facts = {"python_version": version if root is None else None,
             "python_implementation": f"{sys.implementation.name} {sys.version.split()[0]}" if root is None else None,
             "files": {split: len(documents[split]) for split in SPLITS}}
    return TextCorpus(name="stdlib", documents=documents, licence="PSF-2.0", facts=facts,
                      source=f"the .py source of the CPython {version} standard library" if root is None
                      else f"the .py source of a standard library tree ({path.name})")


WIKITEXT_LAYOUTS = (  # (dir under root, or "" for root itself; suffix), searched in this order
    ("", "tokens"), ("", "raw"), ("wikitext-103", "tokens"), ("wikitext-103-raw", "raw"))
WIKITEXT_HOW_TO_GET = (
    "Get wikitext-103-v1.zip (tokenised) or wikitext-103-raw-v1.zip (raw) from the WikiText release "
    "(https://s3.amazonaws.com/research.metamind.io/wikitext/ or a mirror), unzip it, and set data.root to the "
    "dir it makes or its parent. Nothing is downloaded by the suite.")


def wikitext103_corpus(root: str | Path) -> TextCorpus:
    """WikiText-103 (Merity et al. 2016; CC BY-SA 3.0): Wikipedia articles, one file per split.

    Layout (the release's zips, unzipped), ``root`` being the dir with the files or its parent::

        wikitext-103/wiki.{train,valid,test}.tokens       tokenised, rare words as <unk>
        wikitext-103-raw/wiki.{train,valid,test}.raw      the same articles untokenised

    Searched in that order: ``root/wiki.*.tokens``, ``root/wiki.*.raw``, ``root/wikitext-103/``,
    ``root/wikitext-103-raw/``; the first complete set is read. The published sizes of the tokenised
    set: 103,227,021 / 217,646 / 245,569 words in train / valid / test, a vocabulary of 267,735.
    """
    root = Path(root)
    found = {}
    for subdir, suffix in WIKITEXT_LAYOUTS:
        directory = root / subdir
        found = {split: directory / f"wiki.{split}.{suffix}" for split in SPLITS}
        present = [p for p in found.values() if p.is_file()]
        if len(present) == len(SPLITS):
            break
        if present:
            missing = [p.name for p in found.values() if not p.is_file()]
            raise ConfigError(f"WikiText-103 under data.root={root} is incomplete: {directory} has "
                              f"{', '.join(p.name for p in present)} but not {', '.join(missing)}. "
                              f"Expected wiki.{{train,valid,test}}.{suffix} together. {WIKITEXT_HOW_TO_GET}")
    else:
        seen = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else None
        raise ConfigError(
            f"No WikiText-103 under data.root={root}: expected wikitext-103/wiki.{{train,valid,test}}.tokens or "
            f"wikitext-103-raw/wiki.{{train,valid,test}}.raw, in data.root or in a dir of that name under it; found "
            f"{seen if seen else 'an empty dir' if seen is not None else 'no such dir'}. {WIKITEXT_HOW_TO_GET}")
    documents = {}
    for split, path in found.items():
        text = read_utf8(path, what="WikiText-103 file")
        if not text.strip():
            raise ConfigError(f"WikiText-103 file {path} is empty. Expected the articles of the {split} split; "
                              f"replace it with the file from the release. {WIKITEXT_HOW_TO_GET}")
        documents[split] = [text]
    layout = found["train"].suffix.lstrip(".")
    return TextCorpus(name="wikitext103" if layout == "tokens" else "wikitext103_raw", documents=documents,
                      licence="CC BY-SA 3.0", facts={"layout": layout},
                      source=f"WikiText-103 ({layout}; Merity et al. 2016), wiki.{{train,valid,test}}.{layout}")


def text_files_corpus(paths: str | Sequence[str]) -> TextCorpus:
    """Any UTF-8 text: files, and dirs (every ``*.txt`` under them, recursively).

    Each file is split within itself, as nanoGPT splits Shakespeare: its first 90% of characters
    train, the next 5% valid, the last 5% test, each cut moved to just after the next newline where
    there is one. So one file is enough, and every file shows in every split; files are joined in
    the order of their resolved paths, whatever order ``paths`` names them in.
    """
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if not paths:
        raise ConfigError("data.paths is empty: expected a list of UTF-8 text files or dirs of *.txt files, e.g. "
                          "data.paths=[/data/book.txt]. Set it.")
    files: set[Path] = set()
    for entry in map(Path, paths):
        if entry.is_dir():
            inside = [p for p in entry.rglob("*.txt") if p.is_file()]
            if not inside:
                raise ConfigError(f"data.paths names the dir {entry}, which holds no *.txt file. Expected UTF-8 "
                                  "text files, or dirs of *.txt files; name files with other endings one by one.")
            files.update(p.resolve() for p in inside)
        elif entry.is_file():
            files.add(entry.resolve())
        else:
            raise ConfigError(f"data.paths names {entry}, which does not exist. Expected UTF-8 text files or dirs of "
                              "*.txt files; fix the path.")
    documents: dict[str, list[str]] = {split: [] for split in SPLITS}
    for path in sorted(files):
        text = read_utf8(path)
        if not text:
            raise ConfigError(f"text file {path} is empty. Expected UTF-8 text; leave it out of data.paths.")
        first, second = _cut(text, 1 - VALID_FRACTION - TEST_FRACTION), _cut(text, 1 - TEST_FRACTION)
        for split, part in zip(SPLITS, (text[:first], text[first:max(first, second)], text[max(first, second):])):
            documents[split].append(part)
    return TextCorpus(name="text_files", documents=documents, licence="the files' own (unknown to the suite)",
                      source=f"{len(files)} UTF-8 text file(s) named by data.paths", facts={"files": len(files)})


def _cut(text: str, fraction: float) -> int:
    """Just after the first newline at or after ``fraction`` of ``text``; there, when none follows."""
    position = round(fraction * len(text))
    return text.find("\n", position) + 1 or position


# --- tokenized streams and blocks --------------------------------------------------------------


def tokenize_corpus(corpus: TextCorpus, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """Each split's documents encoded and joined into one stream of ids. Bytes are encoded directly (the
    10 MB stdlib corpus in about 10 ms); other tokenizers' streams are cached as ``.npy`` under
    ``<cache>/tokens/<corpus id>/<tokenizer>-<tokenizer hash>/`` (sentencepiece takes about 2 s for the
    stdlib corpus, minutes for WikiText-103) and read back memory-mapped."""
    encode = lambda split: np.concatenate(  # noqa: E731
        [tokenizer.encode(d) for d in corpus.documents[split]] or [np.zeros(0, dtype=np.uint8)])
    if tokenizer.name == "bytes":
        return {split: encode(split) for split in SPLITS}
    description = tokenizer.describe()
    directory = data_cache_dir() / "tokens" / corpus.corpus_id / (
        f"{description['tokenizer']}-{description['tokenizer_sha256'][:16]}")
    streams = {}
    for split in SPLITS:
        path = directory / f"{split}.npy"
        if not path.is_file():
            buffer = io.BytesIO()
            np.save(buffer, encode(split), allow_pickle=False)
            write_atomically(path, buffer.getvalue())
        try:
            streams[split] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ConfigError(f"{path} is not a tokenized stream ({error}). Delete it: it is made again on first "
                              "use.") from error
    return streams


class TokenBlocks(Dataset):
    """Item ``i``: ``(inputs, targets)``, LongTensors of ``block_size`` ids, ``tokens[s : s + T]`` and
    ``tokens[s + 1 : s + T + 1]`` with ``s = starts[i]``."""

    def __init__(self, tokens: np.ndarray, block_size: int, starts: np.ndarray):
        self.tokens, self.block_size, self.starts = tokens, block_size, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        block = torch.from_numpy(self.tokens[start:start + self.block_size + 1].astype(np.int64))
        return block[:-1], block[1:]


# --- the DataModules ---------------------------------------------------------------------------


class LanguageModelDataModule(StabilityDataModule):
    """What every causal-LM DataModule shares; a subclass names its corpus reader (``read_corpus``).

    Options (checked before the corpus is read): ``tokenizer`` (bytes | words | sentencepiece),
    ``vocab_size`` (see ``build_tokenizer``), ``block_size`` T >= 2, ``batch_size`` (per device),
    ``num_workers``, ``seed`` (training order), ``blocks_per_epoch`` (null: every training block),
    ``val_blocks`` (null: every block of the valid and test splits).
    """

    def __init__(self, *, read_corpus: Callable[[], TextCorpus], tokenizer: str, vocab_size: int | None,
                 block_size: int, batch_size: int, num_workers: int, seed: int,
                 blocks_per_epoch: int | None, val_blocks: int | None):
        super().__init__()
        check_tokenizer_options(tokenizer, vocab_size)
        for key, value, smallest in (("block_size", block_size, 2), ("batch_size", batch_size, 1),
                                     ("num_workers", num_workers, 0), ("blocks_per_epoch", blocks_per_epoch, 1),
                                     ("val_blocks", val_blocks, 1)):
            if not (is_whole(value) and value >= smallest) and not (value is None and key in ("blocks_per_epoch",
                                                                                             "val_blocks")):
                nullable = " (or null: all)" if key in ("blocks_per_epoch", "val_blocks") else ""
                raise ConfigError(f"data.{key} must be a whole number >= {smallest}{nullable}; found {value!r}. "
                                  f"Set data.{key} accordingly.")
        corpus = read_corpus()
        self.tokenizer = build_tokenizer(tokenizer, corpus_id=corpus.corpus_id,
                                         training_texts=corpus.documents["train"], vocab_size=vocab_size)
        streams = tokenize_corpus(corpus, self.tokenizer)
        blocks = {split: (len(streams[split]) - 1) // block_size for split in SPLITS}
        for split in SPLITS:
            if blocks[split] < 1:
                raise ConfigError(
                    f"data.block_size={block_size} needs {block_size + 1} tokens for one example; the {split} split of "
                    f"{corpus.name} has {len(streams[split])} ({corpus.bytes[split]} bytes, tokenizer {tokenizer}). "
                    "Lower data.block_size, or give the corpus more text.")
        if batch_size > blocks["train"]:
            raise ConfigError(f"data.batch_size={batch_size} is more than the {blocks['train']} training blocks of "
                              f"{block_size} tokens in {corpus.name}. Lower data.batch_size or data.block_size.")
        if blocks_per_epoch is not None and not batch_size <= blocks_per_epoch <= blocks["train"]:
            raise ConfigError(f"data.blocks_per_epoch must be from data.batch_size={batch_size} to the "
                              f"{blocks['train']} training blocks of {corpus.name}, or null for all of them; found "
                              f"{blocks_per_epoch}. Set it in that range.")
        starts = {split: np.arange(blocks[split]) * block_size for split in SPLITS}
        self.train_set = TokenBlocks(streams["train"], block_size, starts["train"])
        self.val_set, self.test_set = (
            TokenBlocks(streams[split], block_size, starts[split][evenly_spaced(blocks[split], val_blocks)])
            for split in ("valid", "test"))
        self.block_size, self.batch_size, self.num_workers, self.seed = block_size, batch_size, num_workers, seed
        self.blocks_per_epoch = blocks_per_epoch
        self.bytes_per_token = self._bytes_per_target_token(self.val_set) if self.tokenizer.lossless else None
        self._description = {
            **corpus.describe(), **self.tokenizer.describe(),
            "tokens": {split: len(streams[split]) for split in SPLITS},
            "block_size": block_size, "train_blocks": blocks["train"],
            "blocks_per_epoch": blocks_per_epoch or blocks["train"], "val_blocks": len(self.val_set),
            "bytes_per_token": self.bytes_per_token,
        }

    def _bytes_per_target_token(self, blocks: TokenBlocks) -> float:
        """UTF-8 bytes per target token over ``blocks``: what turns the validation loss into bits per byte."""
        sizes = self.tokenizer.token_bytes()
        targets = np.concatenate([blocks.tokens[s + 1:s + blocks.block_size + 1] for s in blocks.starts])
        return float(sizes[targets].sum() / len(targets))

    @property
    def model_kwargs(self) -> dict[str, int]:
        return {"vocab_size": self.tokenizer.vocab_size, "max_seq_len": self.block_size}

    @property
    def task_kwargs(self) -> dict[str, float | None]:
        return {"bytes_per_token": self.bytes_per_token}

    def describe(self) -> dict[str, Any]:
        return self._description

    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer  # None outside Lightning: one process, epochs from loader.sampler.set_epoch
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = (ResumableSampler(len(self.train_set), seed=self.seed, num_replicas=world_size, rank=rank)
                   if self.blocks_per_epoch is None else
                   EpochPrefixSampler(len(self.train_set), per_epoch=self.blocks_per_epoch, seed=self.seed,
                                      num_replicas=world_size, rank=rank))
        if len(sampler) < self.batch_size:
            raise ConfigError(
                f"Each of the {world_size} devices gets {len(sampler)} training blocks an epoch, fewer than "
                f"data.batch_size={self.batch_size} (a per-device batch). Lower data.batch_size, or raise "
                "data.blocks_per_epoch.")
        return ResumableDataLoader(SeededView(self.train_set), sampler=sampler, drop_last=True, trainer=trainer,
                                   **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, shuffle=False, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        """``val_blocks`` blocks of the test split, for ``Trainer.test``."""
        return DataLoader(self.test_set, shuffle=False, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "persistent_workers": self.num_workers > 0, "pin_memory": torch.cuda.is_available(),
                "generator": torch.Generator().manual_seed(self.seed)}

    def probe_batch(self, n: int) -> torch.Tensor:
        """Inputs (n, T) of ``n`` validation blocks evenly spaced over those validated on; always the same."""
        if not is_whole(n) or not 1 <= n <= len(self.val_set):
            raise ConfigError(f"probe batch size must be between 1 and the {len(self.val_set)} validation blocks; "
                              f"found {n}. Set callbacks.diagnostics.probe_size lower, or data.val_blocks higher.")
        return torch.stack([self.val_set[i][0] for i in evenly_spaced(len(self.val_set), n).tolist()])


class StdlibDataModule(LanguageModelDataModule):
    """``data=stdlib``: the standard library's .py source (``stdlib_corpus``), bytes by default."""

    def __init__(self, *, root: str | None = None, tokenizer: str = "bytes", vocab_size: int | None = None,
                 block_size: int = 128, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 blocks_per_epoch: int | None = 256, val_blocks: int | None = 128):
        super().__init__(read_corpus=partial(stdlib_corpus, root), tokenizer=tokenizer, vocab_size=vocab_size,
                         block_size=block_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         blocks_per_epoch=blocks_per_epoch, val_blocks=val_blocks)


class WikiText103DataModule(LanguageModelDataModule):
    """``data=wikitext103 data.root=...``: WikiText-103 (``wikitext103_corpus``), words by default."""

    def __init__(self, *, root: str, tokenizer: str = "words", vocab_size: int | None = None,
                 block_size: int = 512, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 blocks_per_epoch: int | None = None, val_blocks: int | None = None):
        super().__init__(read_corpus=partial(wikitext103_corpus, root), tokenizer=tokenizer, vocab_size=vocab_size,
                         block_size=block_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         blocks_per_epoch=blocks_per_epoch, val_blocks=val_blocks)


class TextFilesDataModule(LanguageModelDataModule):
    """``data=text_files data.paths=[...]``: the user's UTF-8 text (``text_files_corpus``), bytes by default."""

    def __init__(self, *, paths: str | Sequence[str], tokenizer: str = "bytes", vocab_size: int | None = None,
                 block_size: int = 128, batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 blocks_per_epoch: int | None = None, val_blocks: int | None = None):
        super().__init__(read_corpus=partial(text_files_corpus, paths), tokenizer=tokenizer, vocab_size=vocab_size,
                         block_size=block_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         blocks_per_epoch=blocks_per_epoch, val_blocks=val_blocks)
