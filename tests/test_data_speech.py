"""Speech data: the LibriSpeech reader on fake trees (and each bad tree), the embedded espeak corpus
(deterministic, held-out voices and sentences), log-mel features against a direct STFT and mel matrix,
CMVN, SpecAugment per (seed, epoch, utterance), batches, exact mid-epoch resume, the command.

Fake trees are written here with soundfile (sine and noise FLACs of known lengths); every expected
number is computed here from what was written, not by the code under test. The data cache is a tmp dir.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sigma_repro import cli
from sigma_repro.checks import check_required_values
from sigma_repro.data import audio, speech
from sigma_repro.data.speech import (
    ALPHABET,
    EspeakSpeechDataModule,
    GlobalCMVN,
    LibriSpeechDataModule,
    LogMel,
    SpecAugment,
    collate_utterances,
    decode_ids,
    encode_transcript,
    read_librispeech,
    utterance_cmvn,
)
from sigma_repro.errors import ConfigError

from .helpers import assert_loader_resumes_mid_epoch
from .speech_fixtures import TINY_ESPEAK, tiny_espeak_cache

CONF_DATA = Path(__file__).resolve().parent.parent / "conf" / "data"


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch) -> Path:
    cache = tmp_path_factory.mktemp("data_cache")
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(cache))
    return cache


# --- fake LibriSpeech trees ----------------------------------------------------------------------

WORDS = ["THE", "CAT", "SAT", "ON", "A", "MAT", "DOESN'T", "BOOK", "SEE", "TREE"]


def write_flac(path: Path, samples: int, *, seed: int, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    """A FLAC of a sine plus noise, ``samples`` long; the int16 samples written."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(samples)
    data = (wave * 32767).astype(np.int16)
    if channels > 1:
        data = np.stack([data] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data, rate, format="FLAC", subtype="PCM_16")
    return data


def fake_tree(root: Path, subset: str, chapters: dict[tuple[int, int], int], *, base_len: int = 8000) -> dict:
    """``root/LibriSpeech/<subset>`` with ``n`` utterances per (speaker, chapter); returns {id: (text, samples)}."""
    written = {}
    for (speaker, chapter), n in chapters.items():
        directory = root / "LibriSpeech" / subset / str(speaker) / str(chapter)
        lines = []
        for u in range(n):
            utterance_id = f"{speaker}-{chapter}-{u:04d}"
            samples = base_len + 1600 * ((speaker + chapter + u) % 7)
            text = " ".join(WORDS[(speaker + u + k) % len(WORDS)] for k in range(2 + u % 3))
            write_flac(directory / f"{utterance_id}.flac", samples, seed=u + speaker)
            lines.append(f"{utterance_id} {text}\n")
            written[utterance_id] = (text, samples)
        (directory / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return written


@pytest.fixture
def libri_root(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "corpus"
    written = {"train-clean-100": fake_tree(root, "train-clean-100", {(19, 198): 6, (103, 1240): 5, (7, 11): 5}),
               "dev-clean": fake_tree(root, "dev-clean", {(84, 121): 4}),
               "test-clean": fake_tree(root, "test-clean", {(61, 70): 3})}
    return root, written


def test_reader_lists_utterances_in_path_order_with_texts_and_lengths(libri_root):
    root, written = libri_root
    split = read_librispeech(root, ["train-clean-100", "dev-clean"], key="data.train")
    chapter_dirs = sorted(str(p) for s in ("train-clean-100", "dev-clean")
                          for p in (root / "LibriSpeech" / s).glob("*/*"))
    expected_ids = [f.stem for s in ("train-clean-100", "dev-clean")
                    for d in sorted(p for p in chapter_dirs if f"/{s}/" in p)
                    for f in sorted(Path(d).glob("*.flac"))]
    assert split.ids == expected_ids and len(split) == 16 + 4
    every = {**written["train-clean-100"], **written["dev-clean"]}
    assert split.transcripts == [every[i][0] for i in split.ids]
    assert split.samples.tolist() == [every[i][1] for i in split.ids]
    assert split.frames.tolist() == [1 + every[i][1] // 160 for i in split.ids]
    assert split.paths[0].name == f"{split.ids[0]}.flac"


def bad(root: Path, message_parts: list[str], subsets=("train-clean-100",)) -> None:
    with pytest.raises(ConfigError) as error:
        read_librispeech(root, list(subsets), key="data.train")
    for part in message_parts:
        assert part in str(error.value), str(error.value)


def test_bad_trees_are_config_errors_naming_the_file(tmp_path, libri_root):
    root, _ = libri_root
    bad(tmp_path / "nowhere", ["No LibriSpeech/ dir", "does not exist", "openslr.org/12"])
    bad(root / "LibriSpeech", ["set data.root to the dir above LibriSpeech/", "train-clean-100"])
    bad(root, ["'train-other-500' is not there", "dev-clean, test-clean, train-clean-100"],
        subsets=("train-other-500",))
    chapter = root / "LibriSpeech" / "train-clean-100" / "19" / "198"
    transcript = chapter / "19-198.trans.txt"
    original = transcript.read_text()

    transcript.write_text("".join(original.splitlines(keepends=True)[:-1]))  # the last flac loses its line
    bad(root, [str(chapter / "19-198-0005.flac"), "has no transcript"])
    transcript.write_text(original + "19-198-0099 A LINE WITHOUT AUDIO\n")
    bad(root, [str(transcript), "19-198-0099", "no", "19-198-0099.flac"])
    transcript.write_text(original.replace("19-198-0002 ", "19-198-0002 lower case "))
    bad(root, [str(transcript), "line 3", "outside A-Z"])
    transcript.write_text(original)
    transcript.rename(chapter / "elsewhere.txt")
    bad(root, [str(transcript), "is missing"])
    (chapter / "elsewhere.txt").rename(transcript)

    flac = chapter / "19-198-0001.flac"
    good = flac.read_bytes()
    flac.write_bytes(b"not audio at all" * 10)
    bad(root, [str(flac), "Cannot read the audio file"])
    write_flac(flac, 8000, seed=1, rate=22_050)
    bad(root, [str(flac), "22050 Hz", "expected 16000 Hz"])
    write_flac(flac, 8000, seed=1, channels=2)
    bad(root, [str(flac), "2 channels", "mono"])
    flac.write_bytes(good)
    read_librispeech(root, ["train-clean-100"], key="data.train")  # whole again


def test_librispeech_datamodule_needs_a_root_and_reads_the_config_subsets(libri_root):
    root, written = libri_root
    cfg = OmegaConf.load(CONF_DATA / "librispeech.yaml")
    with pytest.raises(ConfigError, match="data.root must be set"):  # what the app checks before instantiating
        check_required_values(OmegaConf.create({"data": cfg}), {"data": "librispeech"})
    with pytest.raises(ConfigError, match="needs data.root"):
        LibriSpeechDataModule(root=None)
    dm = instantiate(cfg, root=str(root), seed=0, batch_size=4, num_workers=0, cmvn_utterances=None)
    assert dm.utterance_ids("valid") == sorted(written["dev-clean"])
    assert dm.transcripts("test") == [written["test-clean"][i][0] for i in sorted(written["test-clean"])]
    with pytest.raises(ConfigError, match="data.val"):
        LibriSpeechDataModule(root=str(root), val="dev-other")


# --- vocabulary ---------------------------------------------------------------------------------


def test_alphabet_ids_and_decoding():
    assert len(ALPHABET) == 28 and speech.VOCAB_SIZE == 29 and speech.BLANK_ID == 0
    ids = encode_transcript("DOESN'T A Z")
    assert ids.tolist() == [6, 17, 7, 21, 16, 2, 22, 1, 3, 1, 28]  # space 1, apostrophe 2, A 3 ... Z 28
    assert decode_ids(torch.tensor([0, *ids.tolist(), 0])) == "DOESN'T A Z"


# --- the embedded corpus -------------------------------------------------------------------------


def test_tiny_espeak_datamodule_batches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(tiny_espeak_cache(tmp_path_factory)))
    dm = instantiate(OmegaConf.load(CONF_DATA / "espeak.yaml"), seed=0, batch_size=4, **TINY_ESPEAK)
    assert dm.model_kwargs == {"input_dim": 80, "vocab_size": 29}
    assert dm.task_kwargs == {"blank_id": 0, "alphabet": ALPHABET}
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    assert batch["features"].dtype == torch.float32 and batch["features"].shape[2] == 80
    for row in range(4):
        index = int(batch["index"][row])
        n, s = int(batch["feature_lengths"][row]), int(batch["target_lengths"][row])
        assert n == 1 + dm.splits["train"].samples[index] // 160
        assert dm.decode(batch["targets"][row, :s]) == dm.transcripts("train")[index]
        assert (batch["features"][row, n:] == 0).all() and (batch["targets"][row, s:] == 0).all()


def test_train_loader_resumes_mid_epoch_exactly(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(tiny_espeak_cache(tmp_path_factory)))
    dm = EspeakSpeechDataModule(seed=3, batch_size=4, **TINY_ESPEAK)
    keys = assert_loader_resumes_mid_epoch(dm.train_dataloader, epoch=2, after=2,
                                           key=lambda b: torch.cat([b["index"].float(), b["features"].sum((1, 2))]))
    assert len(keys) == len(dm.train_indices) // 4
