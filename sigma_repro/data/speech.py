"""Speech recognition data (``task=asr``): LibriSpeech trees, log-mel features, character targets.

| ``data=``       | class                         | corpus                                                 |
|-----------------|-------------------------------|--------------------------------------------------------|
| ``espeak``      | ``EspeakSpeechDataModule``    | stdlib sentences spoken by espeak-ng, built into the   |
|                 |                               | data cache (``sigma_repro.data.audio``); 1 h train,    |
|                 |                               | 5 min dev and test by default                          |
| ``librispeech`` | ``LibriSpeechDataModule``     | ``data.root/LibriSpeech/<subset>/...`` (openslr.org/12) |

Both read the same layout (``read_librispeech``)::

    ROOT/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac
    ROOT/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("<utterance id> TRANSCRIPT" lines)

audio decoded with soundfile (torchaudio 2.11's ``load`` needs torchcodec and FFmpeg), 16 kHz mono.
Every file is checked (header only) in the constructor, a ``ConfigError`` naming the file before any
compute. A split is one or more subsets, utterances in path order; an utterance's ``index`` is its
place in that list, for every split.

Targets: characters of ``ALPHABET`` (space, apostrophe, A-Z), ids 1..28; id 0 is the CTC blank.
Features (``LogMel``): torchaudio's ``MelSpectrogram`` (16 kHz, n_fft 400 = 25 ms Hann window, hop 160
= 10 ms, ``n_mels`` HTK mel bands, power 2, centred), then ``log(x + 1e-6)``; then CMVN, per utterance
(each mel band to mean 0, std 1 over the utterance's frames) or global (mean and std of each band over
the training split's frames, or ``cmvn_utterances`` of them evenly spaced, stored in the data cache
under ``speech/cmvn/``); then SpecAugment in the train loader only (``SpecAugment``: torchaudio's
``FrequencyMasking`` and ``TimeMasking``, masked to 0 = the normalised mean), drawn from the global
RNGs seeded per utterance with the sampler's sample seed, a function of (seed, epoch, utterance index).

The embedded corpus is small (about 1.2 h): its log-mel features are computed once, in ``setup``,
and kept in memory (about 115 MB an hour as float32). LibriSpeech's are computed per item in the
loader's workers. Training utterances longer than ``max_duration`` seconds are dropped, and so are
those whose targets need more CTC frames (labels + repeated neighbours) than the model's output has
(frames // ``subsampling``, about): both counted in ``describe()``; validation and test keep all.

A batch (every loader and ``probe_batch``) is a dict: ``features`` float32 (B, T, n_mels), zero past each
utterance's ``feature_lengths`` int64 (B,); ``targets`` int64 (B, S), padded with 0, ``target_lengths``
int64 (B,); ``index`` int64 (B,). Training batches hold utterances of similar length
(``LengthGroupedSampler``), their order a function of (seed, epoch), resumable mid-epoch exactly
(``sigma_repro.data.sampling``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio
from torch.utils.data import DataLoader, Dataset

from sigma_repro.data import audio
from sigma_repro.data.base import StabilityDataModule, evenly_spaced, is_whole
from sigma_repro.data.parallel import LengthGroupedSampler
from sigma_repro.data.sampling import ResumableDataLoader, seeded_global_rngs
from sigma_repro.data.tokenizers import data_cache_dir, write_atomically
from sigma_repro.errors import ConfigError

ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BLANK_ID = 0
VOCAB_SIZE = len(ALPHABET) + 1  # + the blank
SAMPLE_RATE = audio.SAMPLE_RATE
N_FFT, HOP_LENGTH, LOG_OFFSET = 400, 160, 1e-6
SPLITS = ("train", "valid", "test")
_CHAR_ID = {c: i + 1 for i, c in enumerate(ALPHABET)}


def encode_transcript(text: str) -> np.ndarray:
    """Label ids (1..28) of an upper-case transcript; ``KeyError`` on a character outside ``ALPHABET``."""
    return np.array([_CHAR_ID[c] for c in text], dtype=np.int64)


def decode_ids(ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """Text of label ids; the blank (0) and ids outside the vocabulary give nothing."""
    ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids
    return "".join(ALPHABET[i - 1] for i in ids if 1 <= i <= len(ALPHABET))


# --- LibriSpeech trees --------------------------------------------------------------------------

LIBRISPEECH_LAYOUT = ("ROOT/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac and "
                      "<speaker>-<chapter>.trans.txt beside them (one '<speaker>-<chapter>-<utterance> TRANSCRIPT' "
                      "line per file)")
LIBRISPEECH_HOW_TO_GET = ("LibriSpeech is at https://www.openslr.org/12 (train-clean-100.tar.gz, dev-clean.tar.gz, "
                          "test-clean.tar.gz...): `tar xzf <archive> -C ROOT` for each puts the subsets under "
                          "ROOT/LibriSpeech/. Nothing is downloaded by the suite.")


@dataclass(frozen=True)
class SpeechSplit:
    """The utterances of one split (one or more subsets), in path order: ``ids[i]`` is
    ``<spk>-<chap>-<utt>``, ``paths[i]`` its FLAC, ``transcripts[i]`` its text, ``samples[i]`` its length."""

    subsets: tuple[str, ...]
    ids: list[str]
    paths: list[Path]
    transcripts: list[str]
    samples: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hours(self) -> float:
        return float(self.samples.sum()) / SAMPLE_RATE / 3600

    @property
    def frames(self) -> np.ndarray:
        """Feature frames of each utterance (``MelSpectrogram`` centred: 1 + samples // hop)."""
        return 1 + self.samples // HOP_LENGTH


def _read_transcripts(path: Path, chapter: str, fix: str) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read the transcript file {path}: {error}. {fix}") from error
    texts = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        utterance_id, _, text = line.partition(" ")
        if not utterance_id.startswith(f"{chapter}-") or not text.strip():
            raise ConfigError(f"{path} line {number}: expected '{chapter}-<utterance> TRANSCRIPT'; found {line!r}. "
                              f"{fix}")
        text = " ".join(text.split())
        if any(c not in _CHAR_ID for c in text):
            raise ConfigError(f"{path} line {number}: the transcript {text!r} has characters outside A-Z, apostrophe "
                              f"and space ({sorted({c for c in text if c not in _CHAR_ID})}); expected LibriSpeech's "
                              f"upper-case normalised text. {fix}")
        texts[utterance_id] = text
    return texts


def read_librispeech(root: str | Path, subsets: Sequence[str], *, key: str) -> SpeechSplit:
    """The utterances of ``subsets`` under ``root/LibriSpeech`` (``key``: the config key that named them,
    for errors), every FLAC's header checked: readable, 16 kHz, mono."""
    root = Path(root)
    base = root / "LibriSpeech"
    fix = f"Expected {LIBRISPEECH_LAYOUT}. Re-extract the subset's archive. {LIBRISPEECH_HOW_TO_GET}"
    if not base.is_dir():
        hint = (f" ({root} itself holds {', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())[:6])}: set "
                f"data.root to the dir above LibriSpeech/)" if root.is_dir() else f" ({root} does not exist)")
        raise ConfigError(f"No LibriSpeech/ dir under data.root={root}{hint}. Expected {LIBRISPEECH_LAYOUT}. "
                          f"{LIBRISPEECH_HOW_TO_GET}")
    ids, paths, transcripts, samples = [], [], [], []
    for subset in subsets:
        directory = base / subset
        if not directory.is_dir() or not any(directory.iterdir()):
            found = sorted(p.name for p in base.iterdir() if p.is_dir())
            raise ConfigError(f"{key}: the LibriSpeech subset {subset!r} is {'empty' if directory.is_dir() else 'not'} "
                              f"there: no {directory}/<speaker>/<chapter>/ (subsets found under {base}: "
                              f"{', '.join(found) if found else 'none'}). Set {key} to subsets that are there, or "
                              f"extract {subset}.tar.gz into {root}. {LIBRISPEECH_HOW_TO_GET}")
        for chapter_dir in sorted(p for p in directory.glob("*/*") if p.is_dir()):
            chapter = f"{chapter_dir.parent.name}-{chapter_dir.name}"
            flacs = sorted(chapter_dir.glob("*.flac"))
            transcript_path = chapter_dir / f"{chapter}.trans.txt"
            if not transcript_path.is_file():
                if not flacs:
                    continue
                raise ConfigError(f"{transcript_path} is missing: {len(flacs)} FLAC files in {chapter_dir} have no "
                                  f"transcripts. {fix}")
            texts = _read_transcripts(transcript_path, chapter, fix)
            found = {flac.stem for flac in flacs}
            for flac in flacs:
                if flac.stem not in texts:
                    raise ConfigError(f"{flac} has no transcript: no '{flac.stem} ...' line in {transcript_path}. "
                                      f"{fix}")
            for utterance_id in texts:
                if utterance_id not in found:
                    raise ConfigError(f"{transcript_path} has a line for {utterance_id} but there is no "
                                      f"{chapter_dir / (utterance_id + '.flac')}. {fix}")
            for flac in flacs:
                samples.append(_audio_length(flac, fix))
                ids.append(flac.stem)
                paths.append(flac)
                transcripts.append(texts[flac.stem])
    if not ids:
        raise ConfigError(f"{key}={list(subsets)}: no FLAC files under {', '.join(str(base / s) for s in subsets)}. "
                          f"{fix}")
    return SpeechSplit(tuple(subsets), ids, paths, transcripts, np.array(samples, dtype=np.int64))


def _audio_length(path: Path, fix: str) -> int:
    """Samples of the FLAC ``path`` from its header; ``ConfigError`` unless readable, 16 kHz and mono."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise ConfigError(f"Cannot read the audio file {path}: {error}. Expected a FLAC file. {fix}") from error
    if info.samplerate != SAMPLE_RATE:
        raise ConfigError(f"{path} is sampled at {info.samplerate} Hz; expected {SAMPLE_RATE} Hz, as LibriSpeech "
                          f"(resample it, e.g. `sox in.flac -r 16000 out.flac`, or use the original files).")
    if info.channels != 1:
        raise ConfigError(f"{path} has {info.channels} channels; expected mono audio, as LibriSpeech (mix it down, "
                          f"e.g. `sox in.flac -c 1 out.flac`, or use the original files).")
    if info.frames <= 0:
        raise ConfigError(f"{path} holds no audio. {fix}")
    return int(info.frames)


def read_waveform(path: Path) -> torch.Tensor:
    """float32 samples in [-1, 1) of a mono FLAC, decoded with soundfile."""
    samples, _ = soundfile.read(str(path), dtype="float32", always_2d=False)
    return torch.from_numpy(samples)


# --- features -----------------------------------------------------------------------------------


class LogMel(torch.nn.Module):
    """(samples,) float waveform at 16 kHz -> (frames, n_mels) float32 log-mel, frames = 1 + samples // 160."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=n_mels)

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(waveform) + LOG_OFFSET).T.contiguous()  # (n_mels, T) -> (T, n_mels)


def utterance_cmvn(features: torch.Tensor) -> torch.Tensor:
    """(T, F) features with each band at mean 0, std 1 over the utterance (std floored at 1e-5)."""
    mean = features.mean(0, keepdim=True)
    std = features.std(0, unbiased=False, keepdim=True).clamp_min(1e-5)
    return (features - mean) / std


@dataclass(frozen=True)
class GlobalCMVN:
    """Each band's mean and std over the training frames: ``(features - mean) / std``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std

    @classmethod
    def of(cls, features: Sequence[torch.Tensor]) -> GlobalCMVN:
        """Mean and std (floored at 1e-5) of every frame of ``features``, accumulated in float64."""
        total = sum(f.double().sum(0) for f in features)
        squares = sum((f.double() ** 2).sum(0) for f in features)
        count = sum(len(f) for f in features)
        mean = total / count
        std = (squares / count - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-5)
        return cls(mean.float(), std.float())


class SpecAugment:
    """``freq_masks`` frequency masks of width < ``freq_mask_width`` bands and ``time_masks`` time masks of
    width < ``time_mask_width`` frames and at most ``time_mask_max_fraction`` of the utterance (torchaudio's
    ``FrequencyMasking``/``TimeMasking``), masked to 0; the masks drawn from the global RNGs seeded with
    ``seed``, so the same (utterance, seed) is always masked the same way."""

    def __init__(self, *, freq_masks: int, freq_mask_width: int, time_masks: int, time_mask_width: int,
                 time_mask_max_fraction: float):
        self.freq = [torchaudio.transforms.FrequencyMasking(freq_mask_width)] * freq_masks if freq_mask_width else []
        self.time = ([torchaudio.transforms.TimeMasking(time_mask_width, p=time_mask_max_fraction)] * time_masks
                     if time_mask_width else [])

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, seed: int) -> torch.Tensor:
        spectrogram = features.T.unsqueeze(0)  # (1, F, T), as torchaudio's masks expect
        with seeded_global_rngs(seed):
            for mask in self.freq + self.time:
                spectrogram = mask(spectrogram, 0.0)
        return spectrogram[0].T.contiguous()


# --- datasets and batches -----------------------------------------------------------------------


class Utterances(Dataset):
    """Item ``i`` (or key ``(i, sample_seed)`` from a resumable sampler, then SpecAugment'ed with that seed):
    ``(features (T, F) after CMVN, label ids, index)`` of utterance ``indices[i]`` of ``split``. Features
    come from ``cached`` (the log-mel of every utterance of the split, in memory) or are computed from the
    FLAC (``log_mel``)."""

    def __init__(self, split: SpeechSplit, indices: np.ndarray, *, log_mel: LogMel,
                 normalise: Callable[[torch.Tensor], torch.Tensor], augment: SpecAugment | None = None,
                 cached: list[torch.Tensor] | None = None):
        self.split, self.indices, self.log_mel, self.normalise = split, indices, log_mel, normalise
        self.augment, self.cached = augment, cached
        self.labels = [encode_transcript(split.transcripts[i]) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def frames(self) -> np.ndarray:
        return self.split.frames[self.indices]

    def log_mel_of(self, index: int) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[index]
        return self.log_mel(read_waveform(self.split.paths[index]))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, np.ndarray, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        index = int(self.indices[i])
        features = self.normalise(self.log_mel_of(index))
        if self.augment is not None and seed is not None:
            features = self.augment(features, seed)
        return features, self.labels[i], index


def collate_utterances(items: list[tuple[torch.Tensor, np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """The batch dict (module docstring): features and targets zero-padded on the right."""
    feature_lengths = torch.tensor([len(f) for f, _, _ in items], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for _, t, _ in items], dtype=torch.long)
    features = torch.zeros(len(items), int(feature_lengths.max()), items[0][0].shape[1], dtype=torch.float32)
    targets = torch.zeros(len(items), int(target_lengths.max()), dtype=torch.long)
    for row, (f, t, _) in enumerate(items):
        features[row, :len(f)] = f
        targets[row, :len(t)] = torch.from_numpy(t)
    return {"features": features, "feature_lengths": feature_lengths, "targets": targets,
            "target_lengths": target_lengths, "index": torch.tensor([i for _, _, i in items], dtype=torch.long)}


def ctc_frames_needed(labels: np.ndarray) -> int:
    """The fewest CTC output frames that can emit ``labels``: one per label, plus a blank between repeats."""
    return len(labels) + int((labels[1:] == labels[:-1]).sum())


# --- the DataModules ----------------------------------------------------------------------------


def _check(key: str, value: Any, smallest: float, *, whole: bool = True, meaning: str = "") -> None:
    ok = is_whole(value) if whole else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < smallest:
        raise ConfigError(f"data.{key} must be a {'whole number' if whole else 'number'} >= {smallest}{meaning}; found "
                          f"{value!r}. Set data.{key} accordingly.")


class SpeechDataModule(StabilityDataModule):
    """What both speech DataModules share; a subclass names its splits' reader (``read_splits``).

    Options (checked before any audio is read): ``n_mels`` (mel bands, the model's ``input_dim``),
    ``cmvn`` (utterance | global), ``cmvn_utterances`` (global: the statistics from that many training
    utterances evenly spaced; null: all), ``freq_masks``, ``freq_mask_width``, ``time_masks``,
    ``time_mask_width``, ``time_mask_max_fraction`` (SpecAugment, train loader only; 0 masks: none),
    ``batch_size`` (utterances per device and step), ``num_workers``, ``seed`` (training order and
    masks), ``max_duration`` (seconds: longer training utterances are dropped), ``subsampling`` (the
    model's frames per output frame, for counting the utterances CTC cannot align: 4 for the Conformer's
    two stride-2 convolutions, 3 for the speech transformer's stride-3 one), ``utterances_per_epoch``
    (an epoch is that many training utterances, the first of the epoch's permutation; null: all),
    ``val_utterances`` (validation on that many utterances evenly spaced over the split, the same every
    time; null: all; the test split is always whole), ``features_in_memory`` (compute every log-mel once in ``setup`` and keep it).
    """

    def __init__(self, *, read_splits: Callable[[], dict[str, SpeechSplit]], corpus: dict[str, Any], n_mels: int,
                 cmvn: str, cmvn_utterances: int | None, freq_masks: int, freq_mask_width: int, time_masks: int,
                 time_mask_width: int, time_mask_max_fraction: float, batch_size: int, num_workers: int, seed: int,
                 max_duration: float, subsampling: int, utterances_per_epoch: int | None, val_utterances: int | None,
                 features_in_memory: bool):
        super().__init__()
        for key, value, smallest in (("n_mels", n_mels, 1), ("freq_masks", freq_masks, 0),
                                     ("freq_mask_width", freq_mask_width, 0), ("time_masks", time_masks, 0),
                                     ("time_mask_width", time_mask_width, 0), ("batch_size", batch_size, 1),
                                     ("num_workers", num_workers, 0), ("seed", seed, 0),
                                     ("subsampling", subsampling, 1)):
            _check(key, value, smallest)
        for key, value in (("cmvn_utterances", cmvn_utterances), ("utterances_per_epoch", utterances_per_epoch),
                           ("val_utterances", val_utterances)):
            if value is not None:
                _check(key, value, 1, meaning=" or null (all)")
        _check("max_duration", max_duration, 0.1, whole=False, meaning=" (seconds)")
        _check("time_mask_max_fraction", time_mask_max_fraction, 0.0, whole=False)
        if time_mask_max_fraction > 1 or freq_mask_width > n_mels:
            raise ConfigError(f"data.time_mask_max_fraction must be at most 1 and data.freq_mask_width at most data."
                              f"n_mels={n_mels}; found {time_mask_max_fraction} and {freq_mask_width}.")
        if cmvn not in ("utterance", "global"):
            raise ConfigError(f"data.cmvn must be 'utterance' (each utterance's own mean and std) or 'global' (the "
                              f"training split's); found {cmvn!r}.")
        if not isinstance(features_in_memory, bool):
            raise ConfigError(f"data.features_in_memory must be true or false; found {features_in_memory!r}.")
        self.splits = read_splits()
        train = self.splits["train"]
        self.labels = {split: [encode_transcript(t) for t in self.splits[split].transcripts] for split in SPLITS}
        too_long = train.samples > max_duration * SAMPLE_RATE
        unalignable = {split: np.array([ctc_frames_needed(labels) > frames // subsampling for labels, frames
                                        in zip(self.labels[split], self.splits[split].frames)], dtype=bool)
                       for split in SPLITS}
        self.train_indices = np.flatnonzero(~too_long & ~unalignable["train"])
        if len(self.train_indices) < batch_size:
            raise ConfigError(f"data.batch_size={batch_size} is more than the {len(self.train_indices)} training "
                              f"utterances kept (of {len(train)}; {int(too_long.sum())} longer than data.max_duration="
                              f"{max_duration} s, {int(unalignable['train'].sum())} with more characters than CTC "
                              f"frames). Lower data.batch_size, or raise data.max_duration.")
        if utterances_per_epoch is not None and not batch_size <= utterances_per_epoch <= len(self.train_indices):
            raise ConfigError(f"data.utterances_per_epoch must be from data.batch_size={batch_size} to the "
                              f"{len(self.train_indices)} training utterances kept, or null for all of them; found "
                              f"{utterances_per_epoch}.")
        self.n_mels, self.cmvn, self.cmvn_utterances = n_mels, cmvn, cmvn_utterances
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.utterances_per_epoch, self.features_in_memory = utterances_per_epoch, features_in_memory
        self.val_indices = evenly_spaced(len(self.splits["valid"]), val_utterances)
        self.log_mel = LogMel(n_mels)
        self.augment = SpecAugment(freq_masks=freq_masks, freq_mask_width=freq_mask_width, time_masks=time_masks,
                                   time_mask_width=time_mask_width, time_mask_max_fraction=time_mask_max_fraction)
        self._cached: dict[str, list[torch.Tensor]] | None = None
        self._normalise: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._description = {
            **corpus,
            "splits": {split: {"subsets": list(self.splits[split].subsets), "utterances": len(self.splits[split]),
                               "hours": round(self.splits[split].hours, 4),
                               "speakers": len({i.split("-")[0] for i in self.splits[split].ids})} for split in SPLITS},
            "train_utterances_used": len(self.train_indices), "max_duration": max_duration,
            "train_dropped_too_long": int(too_long.sum()),
            "train_dropped_unalignable": int((unalignable["train"] & ~too_long).sum()),
            "unalignable_kept": {split: int(unalignable[split].sum()) for split in ("valid", "test")},
            "subsampling": subsampling, "utterances_per_epoch": utterances_per_epoch or len(self.train_indices),
            "val_utterances": len(self.val_indices),
            "features": f"log-mel {n_mels} (torchaudio MelSpectrogram 16 kHz, n_fft {N_FFT}, hop {HOP_LENGTH}), "
                        f"log(x + {LOG_OFFSET:g})", "cmvn": cmvn,
            "spec_augment": {"freq_masks": freq_masks, "freq_mask_width": freq_mask_width, "time_masks": time_masks,
                             "time_mask_width": time_mask_width, "time_mask_max_fraction": time_mask_max_fraction},
            "features_in_memory": features_in_memory}

    # what the data fixes for the model and task
    @property
    def model_kwargs(self) -> dict[str, int]:
        return {"input_dim": self.n_mels, "vocab_size": VOCAB_SIZE}

    @property
    def task_kwargs(self) -> dict[str, Any]:
        return {"blank_id": BLANK_ID, "alphabet": ALPHABET}

    def describe(self) -> dict[str, Any]:
        self._prepare_features()
        return self._description

    # text access for WER and transcripts (the task never reads files)
    def _split(self, split: str) -> SpeechSplit:
        if split not in self.splits:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}; found {split!r}.")
        return self.splits[split]

    def transcripts(self, split: str) -> list[str]:
        """Reference text of ``split`` ("train" | "valid" | "test"); item i is batch index i."""
        return self._split(split).transcripts

    def utterance_ids(self, split: str) -> list[str]:
        """LibriSpeech ids ``<spk>-<chap>-<utt>`` of ``split``; item i is batch index i."""
        return self._split(split).ids

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Text of label ids (blanks give nothing)."""
        return decode_ids(ids)

    # features
    def setup(self, stage: str | None = None) -> None:
        self._prepare_features()

    def _prepare_features(self) -> None:
        """The in-memory log-mels (``features_in_memory``) and the CMVN, once."""
        if self._normalise is not None:
            return
        if self.features_in_memory:
            with audio.single_threaded():
                self._cached = {split: [self.log_mel(read_waveform(path)) for path in self.splits[split].paths]
                                for split in SPLITS}
        if self.cmvn == "utterance":
            self._normalise = utterance_cmvn
        else:
            self._normalise = self._global_cmvn()

    def _global_cmvn(self) -> GlobalCMVN:
        """The training split's statistics (kept utterances; ``cmvn_utterances`` of them evenly spaced), from
        the data cache when computed before for the same utterances and features."""
        train = self.splits["train"]
        chosen = self.train_indices[evenly_spaced(len(self.train_indices), self.cmvn_utterances)]
        key = hashlib.sha256(repr((self.n_mels, N_FFT, HOP_LENGTH, LOG_OFFSET, torchaudio.__version__.split("+")[0],
                                   [(str(train.paths[i]), int(train.samples[i])) for i in chosen])).encode())
        path = data_cache_dir() / "speech" / "cmvn" / f"{key.hexdigest()[:16]}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            stats = GlobalCMVN(torch.tensor(stored["mean"]), torch.tensor(stored["std"]))
        else:
            stats = GlobalCMVN.of([self._cached["train"][i] if self._cached else
                                   self.log_mel(read_waveform(train.paths[i])) for i in chosen])
            write_atomically(path, json.dumps({"utterances": len(chosen), "mean": stats.mean.tolist(),
                                               "std": stats.std.tolist()}).encode())
        self._description["cmvn_stats"] = {"path": str(path), "utterances": len(chosen)}
        return stats

    def dataset(self, split: str, *, augment: bool = False, indices: np.ndarray | None = None) -> Utterances:
        """The utterances of ``split`` as a Dataset (train: those kept, with SpecAugment when ``augment``;
        valid: the ``val_utterances`` validated on; or the utterances ``indices`` of the split)."""
        self._prepare_features()
        if indices is None:
            indices = {"train": self.train_indices, "valid": self.val_indices}.get(split)
        if indices is None:
            indices = np.arange(len(self._split(split)))
        return Utterances(self.splits[split], indices, log_mel=self.log_mel, normalise=self._normalise,
                          augment=self.augment if augment else None,
                          cached=self._cached[split] if self._cached else None)

    # loaders
    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer  # None outside Lightning: one process, epochs from loader.sampler.set_epoch
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = self.dataset("train", augment=True)
        sampler = LengthGroupedSampler(dataset.frames, batch_size=self.batch_size, seed=self.seed,
                                       num_replicas=world_size, rank=rank, per_epoch=self.utterances_per_epoch)
        if len(sampler) < self.batch_size:
            raise ConfigError(f"Each of the {world_size} devices gets {len(sampler)} training utterances an epoch, "
                              f"fewer than data.batch_size={self.batch_size}. Lower data.batch_size (or raise "
                              f"data.utterances_per_epoch).")
        return ResumableDataLoader(dataset, sampler=sampler, drop_last=True, trainer=trainer, **self._loader_options())

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.dataset(split)
        return DataLoader(dataset, sampler=np.argsort(dataset.frames, kind="stable").tolist(), **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        """The validation utterances (``val_utterances`` of them), shortest first, no augmentation."""
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        """Every test utterance, shortest first, no augmentation."""
        return self._eval_loader("test")

    def _loader_options(self) -> dict[str, Any]:
        workers = 0 if self.features_in_memory else self.num_workers
        return {"batch_size": self.batch_size, "num_workers": workers, "collate_fn": collate_utterances,
                "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}

    def probe_batch(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` validation utterances evenly spaced over the split, no augmentation; always the same."""
        count = len(self.splits["valid"])
        if not is_whole(n) or not 1 <= n <= count:
            raise ConfigError(f"probe batch size must be between 1 and the {count} validation utterances; found {n}. "
                              "Set callbacks.diagnostics.probe_size lower.")
        dataset = self.dataset("valid", indices=evenly_spaced(count, n))
        return collate_utterances([dataset[i] for i in range(len(dataset))])


SPEECH_DEFAULTS: dict[str, Any] = dict(
    n_mels=80, cmvn="utterance", cmvn_utterances=None, freq_masks=2, freq_mask_width=27, time_masks=2,
    time_mask_width=40, time_mask_max_fraction=0.2, batch_size=32, num_workers=0, seed=0, max_duration=20.0,
    subsampling=4, utterances_per_epoch=None, val_utterances=None)


def voices_summary(voices: Sequence[str]) -> str:
    """``["en+m1", "en-us+m1", "en+f4"...]`` -> ``"2 accents (en, en-us) x variants f4/m1"``."""
    bases = sorted({v.split("+")[0] for v in voices})
    variants = sorted({v.split("+")[1] for v in voices if "+" in v})
    return f"{len(bases)} accents ({', '.join(bases)}) x variants {'/'.join(variants)}"


class EspeakSpeechDataModule(SpeechDataModule):
    """``data=espeak``: the embedded spoken corpus (``sigma_repro.data.audio``), built into the data cache on
    first use (``hours`` of training audio, ``eval_minutes`` each of dev and test), features in memory."""

    def __init__(self, *, hours: float = audio.DEFAULT_HOURS, eval_minutes: float = audio.DEFAULT_EVAL_MINUTES,
                 features_in_memory: bool = True, **options: Any):
        self.corpus_dir = audio.espeak_corpus_dir(hours, eval_minutes)
        manifest = audio.read_manifest(self.corpus_dir)
        corpus = {"corpus": "espeak", "source": manifest["source"], "licence": manifest["licence"],
                  "prepared": str(self.corpus_dir), "sha256": manifest["sha256"], "sentences": manifest["sentences"],
                  "word_types": manifest["word_types"], "espeak_version": manifest["espeak_version"],
                  "voices": {split: voices_summary(manifest["splits"][split]["voices"]) for split in SPLITS}}
        subsets = audio.ESPEAK_SUBSETS
        read = {split: partial(read_librispeech, self.corpus_dir, [subsets[split]], key=f"the corpus's {split} split")
                for split in SPLITS}
        super().__init__(read_splits=lambda: {split: read[split]() for split in SPLITS}, corpus=corpus,
                         features_in_memory=features_in_memory, **{**SPEECH_DEFAULTS, **options})


class LibriSpeechDataModule(SpeechDataModule):
    """``data=librispeech data.root=...``: LibriSpeech subsets from a local tree; features per item."""

    def __init__(self, *, root: str | None = None, train: Sequence[str] = ("train-clean-100",),
                 val: str | Sequence[str] = "dev-clean", test: str | Sequence[str] = "test-clean",
                 features_in_memory: bool = False, **options: Any):
        if not root or root == "???":
            raise ConfigError(f"data=librispeech needs data.root, the dir holding LibriSpeech/ ({LIBRISPEECH_LAYOUT}); "
                              f"none given. {LIBRISPEECH_HOW_TO_GET}")
        subsets = {}
        for key, value in (("train", train), ("val", val), ("test", test)):
            names = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
            if not names or not all(isinstance(n, str) and n and "/" not in n for n in names):
                raise ConfigError(f"data.{key} must be a LibriSpeech subset name or a list of them (train-clean-100, "
                                  f"dev-clean...); found {value!r}.")
            subsets[key] = names
        corpus = {"corpus": "librispeech", "source": f"LibriSpeech under {root}", "root": str(root),
                  "licence": "CC BY 4.0 (LibriSpeech, openslr.org/12)"}
        read = {"train": partial(read_librispeech, root, subsets["train"], key="data.train"),
                "valid": partial(read_librispeech, root, subsets["val"], key="data.val"),
                "test": partial(read_librispeech, root, subsets["test"], key="data.test")}
        super().__init__(read_splits=lambda: {split: read[split]() for split in SPLITS}, corpus=corpus,
                         features_in_memory=features_in_memory, **{**SPEECH_DEFAULTS, **options})
