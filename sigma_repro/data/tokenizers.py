"""Tokenizers of the text families (language modelling, translation): text <-> a 1-D array of token ids.

| ``tokenizer=``    | class                      | vocabulary                                            | lossless |
|-------------------|----------------------------|-------------------------------------------------------|----------|
| ``bytes``         | ``ByteTokenizer``          | the 256 byte values of UTF-8                          | yes      |
| ``words``         | ``WordTokenizer``          | ``<unk>``, ``<eos>``, the training text's words       | no       |
| ``sentencepiece`` | ``SentencePieceTokenizer`` | BPE learnt from the training text, ``vocab_size`` ids | yes      |

Every tokenizer has ``vocab_size``, ``encode(text) -> np.ndarray`` (the smallest unsigned dtype that
holds the ids), ``decode(ids) -> str``, ``lossless`` (``decode(encode(t)) == t`` for every text, so
bits per byte can be computed from its losses) and ``describe()`` (what the run summary records).

``words`` and ``sentencepiece`` are learnt from a corpus's training text once and kept in the data
cache (``data_cache_dir()``: ``$SIGMA_REPRO_DATA``, default ``~/.cache/sigma-repro``), loaded by
name (``<corpus id>-<kind><size>``, the corpus id carrying the hash of its text) when there,
learnt on first use when not; ``sigma-repro data lm`` builds them ahead. Learning is deterministic:
the same training text gives the same file, byte for byte, on every machine (sentencepiece trains
with one thread: its result depends on the thread count). Files are written atomically, so runs of a
sweep that build the same tokenizer at once each write the same bytes and none reads half a file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sigma_repro.errors import ConfigError

TOKENIZERS = ("bytes", "words", "sentencepiece")
SENTENCEPIECE_DEFAULT_VOCAB = 4096
# sentencepiece learns from at most this much training text: evenly spaced lines of a larger corpus
# (WikiText-103's 540 MB would take minutes and GBs for little gain; the stdlib corpus fits whole).
SENTENCEPIECE_TRAINING_BYTES = 64 * 2**20
_CHUNK_CHARS = 4 * 2**20  # long texts are encoded in pieces of about this many characters, cut after a newline


def data_cache_dir() -> Path:
    """Where derived data (tokenizers, tokenized corpora) lives: ``$SIGMA_REPRO_DATA`` or ``~/.cache/sigma-repro``."""
    return Path(os.environ.get("SIGMA_REPRO_DATA") or Path.home() / ".cache" / "sigma-repro")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same dir and a rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        raise ConfigError(
            f"Cannot write {path} in the data cache: {error}. Expected a writable dir; set SIGMA_REPRO_DATA "
            f"to one (now {os.environ.get('SIGMA_REPRO_DATA') or 'unset: ~/.cache/sigma-repro'})."
        ) from error


def id_dtype(vocab_size: int) -> type:
    """The smallest unsigned numpy dtype that holds ids 0 .. vocab_size - 1."""
    return np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.uint32


def line_chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, each cut just after a newline
    where there is one; joined, they are ``text``."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size) + 1 or len(text)
        yield text[start:end]
        start = end


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to learn, lossless."""

    name, vocab_size, lossless = "bytes", 256, True

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Bytes that are not valid UTF-8 (a model's sample may cut a character) decode to U+FFFD."""
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: one."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size}


class WordTokenizer:
    """Whitespace-separated words, one ``<eos>`` per line: the WikiText-103 convention (Merity et al.
    2016; PyTorch's word_language_model example).

    Each line of a text (lines end at ``"\\n"``; a last line without one counts as a line) becomes
    its words, as ``str.split()`` finds them, then ``<eos>``. The vocabulary is ``<unk>`` (id 0),
    ``<eos>`` (id 1), then the words of the training text by falling count, ties in code-point order;
    ``max_vocab_size`` keeps the most frequent. A word outside the vocabulary encodes as ``<unk>``.
    WikiText's tokenised files already spell rare words ``<unk>``, so they share id 0. Decoding joins
    words with one space and ``<eos>`` with a newline: runs of whitespace and unknown words are lost.
    """

    name, lossless = "words", False
    UNK, EOS = "<unk>", "<eos>"
    _WORD_OR_NEWLINE = re.compile(r"\S+|\n")  # \S is the complement of str.isspace, as str.split() uses

    def __init__(self, words: Sequence[str]):
        if list(words[:2]) != [self.UNK, self.EOS] or len(set(words)) != len(words):
            raise ValueError("a word vocabulary starts with <unk>, <eos> and holds each word once")
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @classmethod
    def _tokens(cls, text: str) -> Iterator[list[str]]:
        """The words of ``text`` with ``"\\n"`` for each line end, a piece at a time."""
        for chunk in line_chunks(text if not text or text.endswith("\n") else text + "\n"):
            yield cls._WORD_OR_NEWLINE.findall(chunk)

    @classmethod
    def fit(cls, texts: Sequence[str], max_vocab_size: int | None = None) -> WordTokenizer:
        counts: Counter[str] = Counter()
        for text in texts:
            for tokens in cls._tokens(text):
                counts.update(tokens)
        for special in ("\n", cls.UNK, cls.EOS):
            counts.pop(special, None)
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        keep = None if max_vocab_size is None else max_vocab_size - 2
        return cls([cls.UNK, cls.EOS, *ranked[:keep]])

    def encode(self, text: str) -> np.ndarray:
        index, unk, eos = self.index, self.index[self.UNK], self.index[self.EOS]
        dtype = id_dtype(self.vocab_size)
        pieces = [np.fromiter((eos if t == "\n" else index.get(t, unk) for t in tokens), dtype=dtype, count=len(tokens))
                  for tokens in self._tokens(text)]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        lines, line = [], []
        for word in (self.words[i] for i in np.asarray(ids).tolist()):
            if word == self.EOS:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(word)
        return "".join(lines) + " ".join(line)

    def to_bytes(self) -> bytes:
        """The vocabulary file: one word per line, in id order, UTF-8."""
        return "".join(f"{word}\n" for word in self.words).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> WordTokenizer:
        return cls(data.decode("utf-8").split("\n")[:-1])

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size,
                "tokenizer_sha256": hashlib.sha256(self.to_bytes()).hexdigest()}


class SentencePieceTokenizer:
    """BPE pieces learnt by sentencepiece from a training text; lossless on any UTF-8 text.

    Ids 0-3 are ``<pad>``, ``<unk>``, ``<s>``, ``</s>`` (the translation family pads and brackets
    sentences with them; the LM never emits them), then ``"\\n"`` as a piece of its own, the 256
    byte pieces and the learnt pieces. Trained so that decoding gives back the text exactly:
    ``identity`` normalisation (no NFKC), whitespace kept as it is (no dummy prefix, runs of spaces
    kept, whitespace-only pieces allowed: Python's indentation is text too), and ``byte_fallback``
    (a character outside the vocabulary becomes its UTF-8 bytes, never ``<unk>``). ``"\\n"`` being a
    piece of its own, no piece crosses a line end, so a text encodes as the concatenation of its
    lines' encodings, which lets long texts be encoded in pieces.
    """

    name, lossless = "sentencepiece", True
    PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
    MIN_VOCAB = 4 + 1 + 256 + 1  # the specials, "\n", the byte pieces, and at least one learnt piece
    TRAINER_OPTIONS = {
        "model_type": "bpe",
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "byte_fallback": True,
        "user_defined_symbols": ["\n"],
        "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
        "max_sentence_length": 2**20,  # bytes; a longer line is left out of training (still encoded)
        "num_threads": 1,  # the learnt pieces depend on the thread count (measured): one, on every machine
        "minloglevel": 2,
    }

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.model_proto = model_proto
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = SENTENCEPIECE_DEFAULT_VOCAB) -> bytes:
        """The model file (serialised proto) learnt from ``texts``, their lines as sentencepiece's
        sentences; evenly spaced lines when they are longer than ``SENTENCEPIECE_TRAINING_BYTES``."""
        import sentencepiece

        check_tokenizer_options("sentencepiece", vocab_size)
        total = sum(len(text.encode("utf-8")) for text in texts)
        stride = max(1, math.ceil(total / SENTENCEPIECE_TRAINING_BYTES))
        sentences = (line for text in texts for chunk in line_chunks(text)
                     for line in chunk.splitlines(keepends=True)[::stride])
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model,
                                                     vocab_size=vocab_size, **cls.TRAINER_OPTIONS)
        except RuntimeError as error:  # e.g. "Vocabulary size too high (5000). Please set it to a value <= 3261."
            raise ConfigError(
                f"sentencepiece cannot learn {vocab_size} pieces from this training text ({total} bytes): "
                f"{str(error).rstrip('.')}. Set data.vocab_size (sigma-repro data lm --vocab-size) as it says."
            ) from error
        return model.getvalue()

    def encode(self, text: str) -> np.ndarray:
        pieces = [np.asarray(ids, dtype=id_dtype(self.vocab_size))
                  for ids in self.processor.encode(list(line_chunks(text)))]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=id_dtype(self.vocab_size))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.processor.decode(np.asarray(ids).tolist())

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: 1 for a byte piece, 0 for the special ids, else the piece's text
        (its "▁" standing for a space). Summed over an encoding, the length of the text in bytes."""
        processor = self.processor
        return np.array([1 if processor.is_byte(i) else 0 if processor.is_control(i) or processor.is_unknown(i)
                         else len(processor.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size,
                "tokenizer_sha256": hashlib.sha256(self.model_proto).hexdigest()}


Tokenizer = ByteTokenizer | WordTokenizer | SentencePieceTokenizer


def tokenizer_path(kind: str, name: str) -> Path:
    """The cache file of the learnt tokenizer called ``name``: ``<cache>/<kind>/<name>.{vocab,model}``."""
    return data_cache_dir() / kind / f"{name}.{'vocab' if kind == 'words' else 'model'}"


def tokenizer_name(kind: str, corpus_id: str, vocab_size: int | None) -> str:
    """``<corpus id>-bpe4096`` (sentencepiece), ``<corpus id>-words`` (every word) or ``-words<N>``."""
    return f"{corpus_id}-{'bpe' if kind == 'sentencepiece' else 'words'}{vocab_size or ''}"


def load_tokenizer(kind: str, name: str) -> Tokenizer:
    """The learnt tokenizer ``name`` from the data cache; ``ConfigError`` when it is not there."""
    path = tokenizer_path(kind, name)
    if not path.is_file():
        raise ConfigError(f"No {kind} tokenizer {name!r} in the data cache: expected {path}. Build it with "
                          "`sigma-repro data lm` (see --help), or check SIGMA_REPRO_DATA.")
    try:
        return WordTokenizer.from_bytes(path.read_bytes()) if kind == "words" else SentencePieceTokenizer(
            path.read_bytes())
    except (ValueError, RuntimeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not a {kind} tokenizer ({type(error).__name__}: {error}). Delete it: it is "
                          "learnt again on first use.") from error


def build_tokenizer(kind: str, *, corpus_id: str, training_texts: Sequence[str],
                    vocab_size: int | None = None) -> Tokenizer:
    """The ``kind`` tokenizer of the corpus ``corpus_id`` (name and hash), learnt from ``training_texts``
    (its training split) and cached, or loaded from the cache. ``vocab_size``: bytes, null or 256;
    words, null (every training word) or the number of ids kept; sentencepiece, the number of
    pieces (null: ``SENTENCEPIECE_DEFAULT_VOCAB``)."""
    check_tokenizer_options(kind, vocab_size)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "sentencepiece":
        vocab_size = vocab_size or SENTENCEPIECE_DEFAULT_VOCAB
    name = tokenizer_name(kind, corpus_id, vocab_size)
    if not tokenizer_path(kind, name).is_file():
        tokenizer = (WordTokenizer.fit(training_texts, vocab_size) if kind == "words"
                     else SentencePieceTokenizer(SentencePieceTokenizer.train(training_texts, vocab_size)))
        write_atomically(tokenizer_path(kind, name),
                         tokenizer.to_bytes() if kind == "words" else tokenizer.model_proto)
    return load_tokenizer(kind, name)


def check_tokenizer_options(kind: str, vocab_size: int | None) -> None:
    """``ConfigError`` unless ``kind`` is a tokenizer name and ``vocab_size`` fits it."""
    if kind not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer must be one of {', '.join(TOKENIZERS)}; found {kind!r}. "
                          "Set data.tokenizer to one of them.")
    if vocab_size is None:
        return
    smallest = {"bytes": 256, "words": 3, "sentencepiece": SentencePieceTokenizer.MIN_VOCAB}[kind]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest or (
            kind == "bytes" and vocab_size != 256):
        expected = {"bytes": "null or 256 (bytes have 256 values)",
                    "words": "null (every word of the training text) or a whole number >= 3 (<unk>, <eos> and "
                             "the most frequent words)",
                    "sentencepiece": f"null ({SENTENCEPIECE_DEFAULT_VOCAB}) or a whole number >= {smallest}"}[kind]
        raise ConfigError(f"data.vocab_size for tokenizer={kind} must be {expected}; found {vocab_size!r}. "
                          "Set data.vocab_size accordingly.")
