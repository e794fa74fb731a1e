"""The embedded spoken corpus (``data=espeak``): standard-library sentences spoken by espeak-ng, written
into the data cache as a LibriSpeech tree that ``sigma_repro.data.speech`` then reads like LibriSpeech.

Text (``stdlib_sentences``): English sentences of the running CPython's standard library docstrings
(PSF-2.0; always there, offline). Every module, class and function docstring of the files the LM
corpus reads (``text.stdlib_files``: no test suites, no idlelib/tkinter/lib2to3/distutils...) is cut
into paragraphs and sentences (after ``.``, ``!`` or ``?``); a sentence is kept when it starts with a
capital and is 4 to 14 plain words: lower-case words, capitalised words, ``I`` and ``A``, with inner
apostrophes (``doesn't``), commas or semicolons after a word. Acronyms and identifiers (``HTTP``,
``FrameSummary``, ``os.path``) are left out because espeak spells them letter by letter, so their
spelling would not be what the audio says. The transcript is the sentence upper-cased without its
punctuation (LibriSpeech style); repeated transcripts keep their first sentence; files in path order,
docstrings in ``ast.walk`` order. CPython 3.11.7 (pyenv build): 3,748 sentences, 3,016 word types.

Split (sentences): ``text.hash_split`` of the transcript, about 5% dev and 5% test, never spoken in
train; within a split the sentences are put in the order of their sha256 (mixes modules, the same on
every machine). Speakers: an espeak-ng voice (a base voice = accent, plus a variant = timbre) at a
speaking rate. Train, dev and test use disjoint variants on every base voice (``VOICE_VARIANTS``), so
dev and test are held-out voices; rates ``RATES`` words per minute. espeak-ng runs the words of a sentence
together; each speaker adds a pause of 20, 30 or 40 ms between words (``WORD_GAPS``, espeakWORDGAP, see
``word_gap``) so that word boundaries are audible (written in the manifest: ``word_gap_ms`` and per speaker).

Audio: espeak-ng (``espeak_Synth``, synchronous, through ctypes) from the ``espeakng-loader`` wheel
(libespeak-ng and its data, no root needed), else the system's libespeak-ng, said in forked child
processes, each a fresh library saying 32 consecutive utterances of a split (espeak-ng carries state
from one utterance to the next, see ``Espeak``), two at a time; 22,050 Hz int16,
resampled to 16 kHz with ``torchaudio.functional.resample`` (float64, then rounded to int16) and written
as 16-bit mono FLAC with soundfile. Utterance i of a split says sentence ``i mod n`` of the split with
speaker ``sha256("<split> <i>") mod speakers``; a split ends with the first utterance that brings its
audio to the asked duration (``hours`` train, ``eval_minutes`` dev and test each).

The tree is built in a temporary dir next to its final place and renamed into place at the end (with
``manifest.json`` inside), so a killed build leaves nothing that counts as a corpus; the same inputs
(stdlib files, espeak-ng library and data, the rules here, the sizes) give the same bytes. Its dir name
holds a hash of those inputs: ``<cache>/speech/espeak-<hours>h-<eval_minutes>m-<hash>/``.

The default size (1 h train, 5 min dev and test) on CPython 3.11.7 and espeak-ng 1.52.0, with the word
gaps: train 1,113 utterances (192 speakers; 1,113 of the 3,387 training sentences, 7.3 s the longest),
dev 96 and test 93 (of 176 and 185 held-out sentences), 1.17 h in all, 87 MB on disk; built in 26 s on
2 cores that two training runs kept busy (39 s with the interpreter's start), and the same bytes on a
second build (sha256 eb876584a5df22fb...). The nominal 20 and 40 ms gaps add about 35 and 55 ms a
gap to a 9-word sentence at 170 wpm (en-us+m1).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import multiprocessing
import hashlib
import io
import json
import os
import re
import shutil
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio

from sigma_repro.data.text import hash_split, stdlib_files, stdlib_root
from sigma_repro.data.tokenizers import data_cache_dir
from sigma_repro.errors import ConfigError

SAMPLE_RATE = 16_000
ESPEAK_SUBSETS = {"train": "train-espeak", "valid": "dev-espeak", "test": "test-espeak"}
DEFAULT_HOURS, DEFAULT_EVAL_MINUTES = 1.0, 5.0

# --- the sentences ------------------------------------------------------------------------------

MIN_WORDS, MAX_WORDS = 4, 14
_WORD = r"(?:[A-Z]?[a-z]+(?:'[a-z]+)?|I|A)"
PLAIN_SENTENCE = re.compile(rf"{_WORD}(?:[,;]? {_WORD})*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SENTENCE_RULES = repr((PLAIN_SENTENCE.pattern, SENTENCE_END.pattern, MIN_WORDS, MAX_WORDS, "paragraphs", "ast.walk"))


@dataclass(frozen=True)
class Sentence:
    text: str  # as written in the docstring, without its final punctuation: what espeak speaks
    transcript: str  # upper case, letters, apostrophes and single spaces


def docstring_sentences(docstring: str) -> list[Sentence]:
    """The plain sentences (see the module docstring) of one docstring, in order."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", docstring):
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            sentence = sentence[:-1] if sentence[-1:] in ".!?" else sentence
            if PLAIN_SENTENCE.fullmatch(sentence) and sentence[0].isupper() \
                    and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                kept.append(Sentence(sentence, re.sub(r"[,;]", "", sentence).upper()))
    return kept


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)


def documented_nodes(tree: ast.Module) -> list[ast.AST]:
    """The module, classes and functions of ``tree`` in ``ast.walk`` order (breadth first, fields in
    order), found by walking statement lists only: the nodes that hold docstrings are never inside
    an expression, and skipping expressions makes the walk several times faster."""
    found, queue = [], deque([tree])
    while queue:
        node = queue.popleft()
        if isinstance(node, _DOCUMENTED):
            found.append(node)
        for name in node._fields:
            value = getattr(node, name, None)
            if isinstance(value, list):
                queue.extend(child for child in value if isinstance(child, _STATEMENTS))
    return found


@functools.lru_cache(maxsize=2)
def stdlib_sentences(root: str | None = None) -> tuple[Sentence, ...]:
    """Every plain sentence of the standard library's docstrings (``root`` null: this interpreter's),
    repeated transcripts left out; files in path order, docstrings in ``ast.walk`` order (3.7 s)."""
    path = stdlib_root() if root is None else Path(root)
    seen: set[str] = set()
    sentences = []
    for name in stdlib_files(path):
        try:
            tree = ast.parse((path / name).read_bytes())
        except (SyntaxError, ValueError):  # a file of another Python version's grammar
            continue
        for node in documented_nodes(tree):
            for sentence in docstring_sentences(ast.get_docstring(node) or ""):
                if sentence.transcript not in seen:
                    seen.add(sentence.transcript)
                    sentences.append(sentence)
    return tuple(sentences)


def split_sentences(sentences: Sequence[Sentence]) -> dict[str, list[Sentence]]:
    """``{"train", "valid", "test"}``: ``hash_split`` of each transcript, each split in sha256 order."""
    splits: dict[str, list[Sentence]] = {"train": [], "valid": [], "test": []}
    for sentence in sentences:
        splits[hash_split(sentence.transcript)].append(sentence)
    for split in splits.values():
        split.sort(key=lambda s: hashlib.sha256(s.transcript.encode()).hexdigest())
    return splits


# --- espeak-ng ----------------------------------------------------------------------------------

ESPEAK_SYSTEM_DATA = "/usr/lib/x86_64-linux-gnu/espeak-ng-data"
ESPEAK_INSTALL = ("Install espeak-ng one of two ways: `pip install espeakng-loader` (a wheel with libespeak-ng and its "
                  "voices, no root needed) or `apt-get install espeak-ng` (Debian/Ubuntu; the library and "
                  f"{ESPEAK_SYSTEM_DATA}).")
_AUDIO_OUTPUT_SYNCHRONOUS, _POS_CHARACTER, _ESPEAK_CHARS_AUTO, _ESPEAK_RATE, _ESPEAK_WORDGAP = 2, 1, 0, 1, 7
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
# Base voices (accents) x variants (timbres): each variant speaks in exactly one split, on every base voice.
BASE_VOICES = ("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
               "en-us-nyc")
VOICE_VARIANTS = {"train": ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3"), "valid": ("m6", "f4"),
                  "test": ("m7", "f5")}
RATES = (140, 170, 200)  # words per minute; espeak's default is 175
# Extra pause between words (espeakWORDGAP, units of 10 ms at espeak's default speed): espeak-ng runs the words
# of a sentence together, so without a pause a small model hears no word boundary and merges words (WER near 1
# although CER falls). Each speaker has one of these (``word_gap``).
WORD_GAPS = (2, 3, 4)


def word_gap(voice: str, rate: int) -> int:
    """The extra pause between words of speaker ``(voice, rate)``, in espeak's 10 ms units: ``WORD_GAPS`` at
    (base voice index + variant index + rate index) mod 3, so every gap goes with every accent, timbre and rate."""
    base, variant = voice.split("+")
    variants = [v for split in VOICE_VARIANTS.values() for v in split]
    return WORD_GAPS[(BASE_VOICES.index(base) + variants.index(variant) + RATES.index(rate)) % len(WORD_GAPS)]


def espeak_location() -> tuple[str, str, str]:
    """``(library path, data path, where from)``: the espeakng-loader wheel's, else the system's."""
    try:
        import espeakng_loader
    except ImportError:
        library = ctypes.util.find_library("espeak-ng")
        if library and Path(ESPEAK_SYSTEM_DATA).is_dir():
            return library, ESPEAK_SYSTEM_DATA, "the system's libespeak-ng"
        raise ConfigError("The embedded spoken corpus (data=espeak) is synthesised with espeak-ng, which is not "
                          f"installed: no espeakng_loader module, and no system libespeak-ng with {ESPEAK_SYSTEM_DATA}"
                          f". {ESPEAK_INSTALL} Or use data=librispeech data.root=...") from None
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path(), "the espeakng-loader wheel"


class Espeak:
    """libespeak-ng through ctypes: where it is, its version, and (``speak``, in a child process) speech.

    espeak-ng keeps state from one utterance to the next that its API cannot reset (the pitch flutter's
    phase and other wave-generator globals; ``espeak_Terminate`` + ``espeak_Initialize`` keep them), so
    what an utterance sounds like depends on everything the process said before. The library is only
    ever asked to speak in fresh child processes (``spoken_chunks``), each saying one fixed chunk of a
    split's utterances: an utterance's audio is then a function of its chunk alone. The process that
    builds the corpus loads the library only to read its version.
    """

    def __init__(self):
        self.library_path, self.data_path, self.origin = espeak_location()
        try:
            self.lib = ctypes.CDLL(self.library_path)
        except OSError as error:
            raise ConfigError(f"Cannot load libespeak-ng from {self.library_path}: {error}. "
                              f"{ESPEAK_INSTALL}") from error
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.version = self.lib.espeak_Info(None).decode()  # needs no espeak_Initialize
        self.seedable = hasattr(self.lib, "espeak_ng_SetRandSeed")
        self.sample_rate = 0  # known once initialised, in the child that speaks
        self._chunks: list[np.ndarray] = []

    def _initialise(self) -> None:
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise ConfigError(f"espeak-ng did not start with its data at {self.data_path} (espeak_Initialize returned "
                              f"{self.sample_rate}). {ESPEAK_INSTALL}")
        if self.seedable:
            self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: espeak calls it during espeak_Synth
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def speak(self, text: str, voice: str, rate: int, *, seed: int, word_gap: int = 0) -> np.ndarray:
        """int16 samples at ``self.sample_rate`` (22,050 Hz) of ``text`` said by ``voice`` at ``rate`` wpm,
        with an extra pause of ``word_gap`` x 10 ms between words (espeakWORDGAP).

        Voices with breath noise (f2, f3, f5) draw from espeak-ng's random generator, which it seeds
        from the clock; it is seeded with ``seed`` here (``espeak_ng_SetRandSeed``, espeak-ng 1.52+; with
        an older library their noise differs from build to build: ``seedable`` False, in the manifest)."""
        if not self.sample_rate:
            self._initialise()
        if self.seedable:
            self.lib.espeak_ng_SetRandSeed(seed)
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ConfigError(f"espeak-ng ({self.origin}, data {self.data_path}) has no voice {voice!r}; expected "
                              f"the voices of espeak-ng 1.51 or later. {ESPEAK_INSTALL}")
        self.lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
        self.lib.espeak_SetParameter(_ESPEAK_WORDGAP, word_gap, 0)  # set on every call: espeak keeps it
        self._chunks = []
        encoded = text.encode()
        status = self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_AUTO, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth returned {status} for {text!r} ({voice}, {rate} wpm)")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def inputs_sha256(self) -> str:
        """A hash of what the audio is a function of on espeak's side: version, library, the data used."""
        digest = hashlib.sha256(f"{self.version}\0".encode())
        digest.update(hashlib.sha256(Path(self.library_path).read_bytes()).digest())
        data = Path(self.data_path)
        for name in ["en_dict", "phondata", "phonindex", "phontab", "intonations"] + [
                f"voices/!v/{v}" for split in VOICE_VARIANTS.values() for v in split]:
            digest.update(f"{name}\0".encode() + (hashlib.sha256((data / name).read_bytes()).digest()
                                                   if (data / name).is_file() else b"missing"))
        return digest.hexdigest()


Line = tuple[str, str, int, int, int]  # (text, voice, rate, word gap, noise seed)
CHUNK_UTTERANCES = 32  # utterances a child process says (a fork costs about 0.1 s)


def _speak_chunk(connection, lines: list[Line]) -> None:
    """In a fresh child process: say ``lines`` with a library that has said nothing before; send back
    ``(sample rate, [int16 arrays])`` or the exception."""
    try:
        espeak = Espeak()
        spoken = [espeak.speak(text, voice, rate, seed=seed, word_gap=gap) for text, voice, rate, gap, seed in lines]
        connection.send((espeak.sample_rate, spoken))
    except BaseException as error:  # sent to the parent, which raises it
        connection.send(error)
    finally:
        connection.close()


def spoken_chunks(chunks: Iterator[list[Line]], workers: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(sample rate, audio)`` of each chunk of lines in order, each said in a fresh forked child, up to
    ``workers`` at a time. The children use ctypes and numpy only (never torch, which is not safe to
    use after a fork); the ones still running when the caller stops are killed."""
    context = multiprocessing.get_context("fork")
    running: deque = deque()
    try:
        for chunk in chunks:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_speak_chunk, args=(send, chunk), daemon=True)
            process.start()
            send.close()
            running.append((process, receive))
            while len(running) >= workers:
                yield _receive(*running.popleft())
        while running:
            yield _receive(*running.popleft())
    finally:
        for process, _ in running:
            process.kill()
            process.join()


def _receive(process, receive) -> tuple[int, list[np.ndarray]]:
    try:
        result = receive.recv()
    except EOFError:
        result = RuntimeError(f"the espeak-ng child process died (exit code {process.join() or process.exitcode})")
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread inside (restored after): per-utterance audio work (a resampling, a 400-point
    STFT) is too small to split, and on a busy machine two threads take several times as long as one
    (measured on 2 shared cores: a 3 s utterance resampled in 7 ms on one thread, 29 ms on two; the
    embedded corpus's log-mels in 4.5 s on one, 57 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=2)
def _resampler(rate: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(rate, SAMPLE_RATE, dtype=torch.float64)  # its kernel made once


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 samples at ``rate`` resampled to 16 kHz int16 (torchaudio's sinc resampler, Hann window,
    6 zero crossings, in float64 so that rounding to int16 is the same on every CPU)."""
    resampled = _resampler(rate)(torch.from_numpy(samples.astype(np.float64) / 32768.0))
    return (resampled * 32768.0).round().clamp(-32768, 32767).to(torch.int16).numpy()


def flac_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


# --- the corpus ---------------------------------------------------------------------------------

ESPEAK_LICENCE = ("sentences: PSF-2.0 (the CPython standard library's docstrings); audio: generated by espeak-ng "
                  "(GPL-3.0-or-later; its output is not covered by it)")


def speakers(split: str) -> list[tuple[str, int]]:
    """The ``(voice, rate)`` speakers of ``split``: every base voice with the split's variants, at every rate."""
    return [(f"{base}+{variant}", rate) for base in BASE_VOICES for variant in VOICE_VARIANTS[split] for rate in RATES]


def speaker_ids() -> dict[tuple[str, int], int]:
    """A LibriSpeech speaker number for every ``(voice, rate)`` of every split (train first), from 1."""
    every = [speaker for split in ("train", "valid", "test") for speaker in speakers(split)]
    return {speaker: number for number, speaker in enumerate(every, start=1)}


@dataclass(frozen=True)
class PlannedUtterance:
    sentence: Sentence
    voice: str
    rate: int
    seed: int

    @property
    def line(self) -> Line:
        return self.sentence.text, self.voice, self.rate, word_gap(self.voice, self.rate), self.seed


def utterance_plan(sentences: Sequence[Sentence], split_speakers: Sequence[tuple[str, int]], split: str,
                   i: int) -> PlannedUtterance:
    """Utterance ``i`` of ``split``: sentence ``i mod n``; speaker and noise seed from ``sha256("<split> <i>")``."""
    pick = int.from_bytes(hashlib.sha256(f"{split} {i}".encode()).digest()[:8], "big")
    voice, rate = split_speakers[pick % len(split_speakers)]
    return PlannedUtterance(sentences[i % len(sentences)], voice, rate, pick % 2**31)


def espeak_corpus_inputs(hours: float, eval_minutes: float, espeak: Espeak) -> str:
    """The sha256 of everything the corpus's bytes are a function of."""
    root = stdlib_root()
    digest = hashlib.sha256(repr((SENTENCE_RULES, "utterance i: sentence i mod n, speaker and noise seed from "
                                  "sha256('<split> <i>'); float64 sinc resampling", CHUNK_UTTERANCES, BASE_VOICES,
                                  VOICE_VARIANTS,
                                  RATES, ("word gap", WORD_GAPS, "base + variant + rate index mod 3"), SAMPLE_RATE,
                                  hours,
                                  eval_minutes, [hash_split(f"sentence {i}") for i in range(64)],
                                  torchaudio.__version__.split("+")[0], soundfile.__libsndfile_version__)).encode())
    for name in stdlib_files(root):
        digest.update(f"{name}\0".encode() + hashlib.sha256((root / name).read_bytes()).digest())
    digest.update(espeak.inputs_sha256().encode())
    return digest.hexdigest()


def _check_size(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1000:
        raise ConfigError(f"{key} must be a positive number of {key.split('_')[-1]} (at most 1000); found {value!r}.")
    return float(value)


def espeak_corpus_dir(hours: float = DEFAULT_HOURS, eval_minutes: float = DEFAULT_EVAL_MINUTES, *,
                      workers: int = 2) -> Path:
    """The corpus's dir in the cache, built now unless there (see the module docstring), with ``workers``
    child processes speaking at a time (the bytes do not depend on it)."""
    hours, eval_minutes = _check_size("data.hours", hours), _check_size("data.eval_minutes", eval_minutes)
    espeak = Espeak()
    inputs = espeak_corpus_inputs(hours, eval_minutes, espeak)
    directory = data_cache_dir() / "speech" / f"espeak-{hours:g}h-{eval_minutes:g}m-{inputs[:16]}"
    if not (directory / "manifest.json").is_file():
        with single_threaded():
            build_espeak_corpus(directory, hours=hours, eval_minutes=eval_minutes, espeak=espeak,
                                inputs_sha256=inputs, workers=max(1, workers))
    return directory


def build_espeak_corpus(directory: Path, *, hours: float, eval_minutes: float, espeak: Espeak,
                        inputs_sha256: str, workers: int = 2) -> None:
    """Write the corpus (``LibriSpeech/<subset>/<spk>/<rate>/<spk>-<rate>-<utt>.flac`` + ``.trans.txt``
    and ``manifest.json``) into a temporary dir, then rename it to ``directory``."""
    sentences = stdlib_sentences()
    by_split = split_sentences(sentences)
    if not all(by_split.values()):
        raise ConfigError(f"The standard library at {stdlib_root()} gave {len(sentences)} plain docstring sentences, "
                          "too few to fill train, dev and test; expected thousands (3,748 with CPython 3.11.7). Use a "
                          "Python with its .py standard library, or data=librispeech data.root=...")
    numbers = speaker_ids()
    for stale in directory.parent.glob(f".{directory.name}.*.tmp"):  # left by a killed build
        if not _alive(int(stale.suffixes[-2][1:]) if stale.suffixes[-2][1:].isdigit() else -1):
            shutil.rmtree(stale, ignore_errors=True)
    temporary = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    digest = hashlib.sha256()
    facts: dict[str, Any] = {}
    try:
        for split, subset in ESPEAK_SUBSETS.items():
            seconds = hours * 3600 if split == "train" else eval_minutes * 60
            split_speakers = speakers(split)
            plan = partial(utterance_plan, by_split[split], split_speakers, split)
            chunks = ([plan(i).line for i in range(start, start + CHUNK_UTTERANCES)]
                      for start in itertools.count(0, CHUNK_UTTERANCES))
            transcripts: dict[Path, list[str]] = {}
            total, utterances, used = 0, 0, set()
            for rate_in, chunk in spoken_chunks(chunks, workers):
                for samples in chunk:
                    if total >= seconds * SAMPLE_RATE:
                        break
                    planned = plan(utterances)
                    sentence, rate = planned.sentence, planned.rate
                    speaker = numbers[(planned.voice, rate)]
                    chapter_dir = temporary / "LibriSpeech" / subset / str(speaker) / str(rate)
                    lines = transcripts.setdefault(chapter_dir, [])
                    utterance_id = f"{speaker}-{rate}-{len(lines):04d}"
                    audio = to_16k(samples, rate_in)
                    chapter_dir.mkdir(parents=True, exist_ok=True)
                    encoded = flac_bytes(audio)
                    (chapter_dir / f"{utterance_id}.flac").write_bytes(encoded)
                    lines.append(f"{utterance_id} {sentence.transcript}\n")
                    digest.update(f"{utterance_id} {sentence.transcript}\n".encode() + hashlib.sha256(encoded).digest())
                    total, utterances = total + len(audio), utterances + 1
                    used.add(sentence.transcript)
                if total >= seconds * SAMPLE_RATE:
                    break
            for chapter_dir, lines in transcripts.items():
                (chapter_dir / f"{chapter_dir.parent.name}-{chapter_dir.name}.trans.txt").write_text("".join(lines))
            facts[split] = {"subset": subset, "utterances": utterances, "hours": round(total / SAMPLE_RATE / 3600, 4),
                            "sentences_available": len(by_split[split]), "sentences_spoken": len(used),
                            "voices": sorted({voice for voice, _ in split_speakers}), "rates": list(RATES),
                            "speakers": {str(numbers[s]): f"{s[0]} {s[1]} wpm, word gap {10 * word_gap(*s)} ms"
                                         for s in split_speakers}}
        word_types = len({word for sentence in sentences for word in sentence.transcript.split()})
        manifest = {
            "corpus": "espeak",
            "source": f"sentences of the CPython {sys.version.split()[0]} standard library's docstrings "
            f"({len(sentences):,} sentences, {word_types:,} word types), spoken by espeak-ng {espeak.version} "
            f"({espeak.origin})", "licence": ESPEAK_LICENCE, "sentences": len(sentences), "word_types": word_types,
            "espeak_version": espeak.version, "espeak_from": espeak.origin,
            "espeak_noise_seeded": espeak.seedable, "sample_rate": SAMPLE_RATE,
            "word_gap_ms": {"values": [10 * g for g in WORD_GAPS], "rule": "extra pause between words (espeakWORDGAP, "
                            "10 ms units at espeak's default speed), one per speaker: WORD_GAPS[(base voice + variant + "
                            "rate index) mod 3]"},
            "splits": facts, "inputs_sha256": inputs_sha256, "sha256": digest.hexdigest()}
        (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(temporary, directory)
        except OSError:
            if not (directory / "manifest.json").is_file():  # not another process that finished first
                raise
    except OSError as error:
        raise ConfigError(f"Cannot write the spoken corpus into {temporary}: {error}. Expected a writable dir; set "
                          f"SIGMA_REPRO_DATA to one (now {os.environ.get('SIGMA_REPRO_DATA') or 'unset'}).") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"The spoken corpus {directory} has no readable manifest.json ({error}). Delete the dir: "
                          "it is built again on first use.") from error
