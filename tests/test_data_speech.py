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
    dm = instantiate(OmegaConf.load(CONF_DATA / "espeak.yaml"), seed=0, batch_size=4, utterances_per_epoch=None, **TINY_ESPEAK)
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


def test_val_utterances_validates_on_evenly_spaced_dev_utterances_and_leaves_the_probe_and_test_whole(
        tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(tiny_espeak_cache(tmp_path_factory)))
    whole = EspeakSpeechDataModule(seed=0, batch_size=4, **TINY_ESPEAK)
    part = EspeakSpeechDataModule(seed=0, batch_size=4, val_utterances=4, **TINY_ESPEAK)
    dev = len(whole.transcripts("valid"))
    seen = sorted(i for b in part.val_dataloader() for i in b["index"].tolist())
    # 4 of the dev utterances: the first, the last and two between, evenly spaced
    assert seen == [round(k * (dev - 1) / 3) for k in range(4)]
    assert sorted(i for b in whole.val_dataloader() for i in b["index"].tolist()) == list(range(dev))
    assert sum(len(b["index"]) for b in part.test_dataloader()) == len(part.transcripts("test"))
    for key in ("features", "index"):
        assert torch.equal(part.probe_batch(6)[key], whole.probe_batch(6)[key])
    assert part.describe()["val_utterances"] == 4
    with pytest.raises(ConfigError, match="val_utterances"):
        EspeakSpeechDataModule(seed=0, batch_size=4, val_utterances=0, **TINY_ESPEAK)


def test_train_loader_resumes_mid_epoch_exactly(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(tiny_espeak_cache(tmp_path_factory)))
    dm = EspeakSpeechDataModule(seed=3, batch_size=4, **TINY_ESPEAK)
    keys = assert_loader_resumes_mid_epoch(dm.train_dataloader, epoch=2, after=2,
                                           key=lambda b: torch.cat([b["index"].float(), b["features"].sum((1, 2))]))
    assert len(keys) == len(dm.train_indices) // 4


def test_docstring_sentences_keep_plain_sentences_only():
    doc = ("Return the number of items, or raise an error.  Uses os.path internally.\n"
           "See HTTPServer for details.  Short one.\n\n"
           "This paragraph's sentence doesn't end\n"
           "with a stop; it stays whole!  it starts lower case and is dropped.  One two three four five six seven "
           "eight nine ten eleven twelve thirteen fourteen fifteen.")
    kept = audio.docstring_sentences(doc)
    assert [s.text for s in kept] == [
        "Return the number of items, or raise an error",
        "This paragraph's sentence doesn't end with a stop; it stays whole"]
    assert [s.transcript for s in kept] == [
        "RETURN THE NUMBER OF ITEMS OR RAISE AN ERROR",
        "THIS PARAGRAPH'S SENTENCE DOESN'T END WITH A STOP IT STAYS WHOLE"]


def test_documented_nodes_are_those_of_ast_walk_in_its_order():
    source = (Path(audio.__file__).parent / "parallel.py").read_bytes()
    tree = __import__("ast").parse(source)
    walked = [n for n in __import__("ast").walk(tree) if isinstance(n, audio._DOCUMENTED)]
    assert audio.documented_nodes(tree) == walked and len(walked) > 40


def corpus_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_espeak_corpus_is_deterministic_with_held_out_voices_and_sentences(tmp_path_factory, data_cache):
    first = audio.espeak_corpus_dir(**TINY_ESPEAK)  # this test's cache
    second = tiny_espeak_cache(tmp_path_factory) / "speech" / first.name  # the session's, built separately
    assert first != second and corpus_files(first) == corpus_files(second)
    assert not list(first.parent.glob(".*.tmp"))
    manifest = json.loads((first / "manifest.json").read_text())
    splits = {split: read_librispeech(first, [subset], key="x") for split, subset in audio.ESPEAK_SUBSETS.items()}
    voices = {split: {manifest["splits"][split]["speakers"][i.split("-")[0]].split()[0] for i in splits[split].ids}
              for split in splits}
    assert voices["train"].isdisjoint(voices["valid"] | voices["test"]) and voices["valid"].isdisjoint(voices["test"])
    texts = {split: set(s.transcripts) for split, s in splits.items()}
    assert texts["train"].isdisjoint(texts["valid"] | texts["test"]) and texts["valid"].isdisjoint(texts["test"])
    for split, s in splits.items():
        assert manifest["splits"][split]["utterances"] == len(s)
        asked = TINY_ESPEAK["hours"] * 3600 if split == "train" else TINY_ESPEAK["eval_minutes"] * 60
        durations = s.samples / 16_000
        # the split stops at the first utterance that reaches the asked duration; the reader's order is the
        # files' (not the order spoken), so without that utterance it falls short of `asked` even without the longest
        assert durations.sum() >= asked > durations.sum() - durations.max()
        assert math.isclose(manifest["splits"][split]["hours"], durations.sum() / 3600, abs_tol=1e-4)
    assert manifest["sentences"] > 3000 and manifest["word_types"] > 2500 and manifest["licence"].startswith("sent")
    samples, rate = soundfile.read(str(splits["train"].paths[0]), dtype="int16")
    info = soundfile.info(str(splits["train"].paths[0]))
    assert rate == 16_000 and samples.ndim == 1 and info.subtype == "PCM_16" and np.abs(samples).max() > 1000


def test_a_killed_build_leaves_no_corpus(monkeypatch, data_cache):
    calls = []

    def dies_at_the_fifth(samples):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a kill would stop it
        return real(samples)

    real = audio.flac_bytes
    monkeypatch.setattr(audio, "flac_bytes", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        audio.espeak_corpus_dir(hours=0.005, eval_minutes=0.1)
    speech_dir = data_cache / "speech"
    assert not [p for p in speech_dir.iterdir()]  # neither the corpus nor its temporary dir
    monkeypatch.setattr(audio, "flac_bytes", real)
    name = f"espeak-0.005h-0.1m-{audio.espeak_corpus_inputs(0.005, 0.1, audio.Espeak())[:16]}"
    stale = speech_dir / f".{name}.999999999.tmp" / "LibriSpeech"  # as a SIGKILLed build leaves it
    stale.mkdir(parents=True)
    built = audio.espeak_corpus_dir(hours=0.005, eval_minutes=0.1)
    assert built.name == name and (built / "manifest.json").is_file()
    assert [p.name for p in speech_dir.iterdir()] == [name]  # the stale temporary dir is gone


def test_without_espeak_the_error_says_what_to_install(monkeypatch):
    import builtins
    import ctypes.util

    real_import = builtins.__import__

    def no_loader(name, *args, **kwargs):
        if name == "espeakng_loader":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_loader)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(ConfigError) as error:
        audio.espeak_location()
    assert "`pip install espeakng-loader`" in str(error.value) and "`apt-get install espeak-ng`" in str(error.value)


# --- features ------------------------------------------------------------------------------------


def direct_log_mel(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """(T, n_mels) in float64 by hand: reflect-padded 400-sample frames every 160, periodic Hann window,
    |rfft|^2, triangular HTK mel filters from 0 to 8 kHz (unnormalised), log(x + 1e-6)."""
    n_fft, hop = 400, 160
    padded = np.pad(samples.astype(np.float64), n_fft // 2, mode="reflect")
    count = 1 + len(samples) // hop
    frames = np.stack([padded[i * hop:i * hop + n_fft] for i in range(count)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, 201)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(0), mel(8000), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, 8000, n_fft // 2 + 1)
    bank = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        rising = (freqs - edges[m]) / (edges[m + 1] - edges[m])
        falling = (edges[m + 2] - freqs) / (edges[m + 2] - edges[m + 1])
        bank[:, m] = np.clip(np.minimum(rising, falling), 0, None)
    return np.log(power @ bank + 1e-6)


@pytest.mark.parametrize("n_mels", [80, 40])
def test_log_mel_matches_a_direct_stft_and_mel_matrix(tmp_path, n_mels):
    written = write_flac(tmp_path / "a.flac", 12_345, seed=2).astype(np.float64) / 32768
    waveform = speech.read_waveform(tmp_path / "a.flac")
    assert np.array_equal(waveform.numpy(), written.astype(np.float32))
    ours = LogMel(n_mels)(waveform).numpy()
    expected = direct_log_mel(written, n_mels)
    assert ours.shape == expected.shape == (1 + 12_345 // 160, n_mels)
    np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=1e-4)


def test_cmvn_utterance_and_global_numbers():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3, 2, (50, 4)), rng.normal(-1, 0.5, (30, 4))
    normalised = utterance_cmvn(torch.tensor(a, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(normalised, (a - a.mean(0)) / a.std(0), atol=1e-5)
    stats = GlobalCMVN.of([torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)])
    both = np.concatenate([a, b])
    np.testing.assert_allclose(stats.mean.numpy(), both.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats.std.numpy(), both.std(0), atol=1e-5)
    np.testing.assert_allclose(stats(torch.tensor(b, dtype=torch.float32)).numpy(),
                               (b - both.mean(0)) / both.std(0), atol=1e-5)


def test_global_cmvn_is_the_training_frames_statistics_and_is_stored(libri_root, data_cache):
    root, written = libri_root
    dm = LibriSpeechDataModule(root=str(root), cmvn="global", cmvn_utterances=None, batch_size=2)
    train = dm.splits["train"]
    kept = [train.paths[i] for i in dm.train_indices]  # the training utterances used (some are unalignable)
    frames = np.concatenate([direct_log_mel(soundfile.read(str(p), dtype="float64")[0], 80) for p in kept])
    dm.setup("fit")
    stats = dm._normalise
    np.testing.assert_allclose(stats.mean.numpy(), frames.mean(0), atol=2e-3)
    np.testing.assert_allclose(stats.std.numpy(), frames.std(0), rtol=2e-3, atol=2e-3)
    stored = list((data_cache / "speech" / "cmvn").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["utterances"] == len(kept) > 5
    item = dm.dataset("valid")[0][0].double().numpy()
    direct = direct_log_mel(soundfile.read(str(dm.splits["valid"].paths[0]), dtype="float64")[0], 80)
    np.testing.assert_allclose(item, (direct - frames.mean(0)) / frames.std(0), atol=1e-2)
    again = LibriSpeechDataModule(root=str(root), cmvn="global", cmvn_utterances=None, batch_size=2)
    again.setup("fit")  # read back from the store
    assert torch.equal(again._normalise.mean, stats.mean) and torch.equal(again._normalise.std, stats.std)


# --- SpecAugment and the loaders -----------------------------------------------------------------


def test_spec_augment_masks_whole_bands_and_frames_with_zero_the_same_way_per_seed():
    features = torch.randn(300, 80) + 5
    augment = SpecAugment(freq_masks=2, freq_mask_width=27, time_masks=2, time_mask_width=40,
                          time_mask_max_fraction=0.2)
    a, b, c = augment(features, 11), augment(features, 11), augment(features, 12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = a != features
    assert (a[changed] == 0).all()
    bands, frames = changed.all(0), changed.all(1)  # masked entries are whole bands or whole frames
    assert torch.equal(changed, bands[None, :] | frames[:, None])
    assert 0 < bands.sum() <= 2 * 26 and frames.sum() <= 2 * min(39, int(0.2 * 300))
    state = torch.random.get_rng_state()
    augment(features, 13)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was


def test_train_batches_are_augmented_per_seed_epoch_and_utterance(libri_root):
    root, _ = libri_root
    dm = LibriSpeechDataModule(root=str(root), cmvn="utterance", batch_size=4, seed=5, max_duration=100.0)
    plain = dm.dataset("train")

    def epoch_features(epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        keys = dict(loader.sampler.epoch_keys())
        seen = {}
        for batch in loader:
            for row, index in enumerate(batch["index"].tolist()):
                position = int(np.flatnonzero(dm.train_indices == index)[0])
                n = int(batch["feature_lengths"][row])
                expected = dm.augment(plain[position][0], keys[position])
                assert torch.equal(batch["features"][row, :n], expected)
                seen[index] = batch["features"][row, :n]
        return seen

    first, again, other = epoch_features(1), epoch_features(1), epoch_features(2)
    assert first.keys() == again.keys() and all(torch.equal(first[i], again[i]) for i in first)
    assert any(not torch.equal(first[i], other[i]) for i in first.keys() & other.keys())


def test_eval_loaders_hold_every_utterance_in_length_order_unaugmented(libri_root):
    root, written = libri_root
    dm = LibriSpeechDataModule(root=str(root), batch_size=3)
    for split, subset in (("valid", "dev-clean"), ("test", "test-clean")):
        batches = list(dm.val_dataloader() if split == "valid" else dm.test_dataloader())
        order = [i for b in batches for i in b["index"].tolist()]
        lengths = [1 + written[subset][dm.utterance_ids(split)[i]][1] // 160 for i in order]
        assert sorted(order) == list(range(len(written[subset]))) and lengths == sorted(lengths)
        for b in batches:
            for row, index in enumerate(b["index"].tolist()):
                assert torch.equal(b["features"][row, :b["feature_lengths"][row]], dm.dataset(split)[index][0])
    probe = dm.probe_batch(3)
    assert probe["index"].tolist() == [0, 2, 3] and torch.equal(probe["features"], dm.probe_batch(3)["features"])


def test_collate_pads_with_zeros_and_keeps_lengths():
    items = [(torch.ones(3, 2), np.array([3, 4]), 7), (torch.full((5, 2), 2.0), np.array([5, 6, 7]), 1)]
    batch = collate_utterances(items)
    assert batch["features"].tolist() == [[[1, 1]] * 3 + [[0, 0]] * 2, [[2, 2]] * 5]
    assert batch["targets"].tolist() == [[3, 4, 0], [5, 6, 7]]
    assert batch["feature_lengths"].tolist() == [3, 5] and batch["target_lengths"].tolist() == [2, 3]
    assert batch["index"].tolist() == [7, 1] and {v.dtype for k, v in batch.items() if k != "features"} == {torch.long}


def test_long_and_unalignable_training_utterances_are_dropped_and_counted(tmp_path):
    root = tmp_path / "corpus"
    fake_tree(root, "dev-clean", {(1, 2): 2})
    fake_tree(root, "test-clean", {(1, 2): 2})
    chapter = root / "LibriSpeech" / "train-clean-100" / "5" / "6"
    lengths = [16_000, 48_000, 3_200, 32_000, 16_000]  # 1 s, 3 s, 0.2 s, 2 s, 1 s
    texts = ["A CAT", "THE CAT SAT", "A LONG SENTENCE FOR A FIFTH OF A SECOND", "SEE", "BOOK"]
    for u, (n, text) in enumerate(zip(lengths, texts)):
        write_flac(chapter / f"5-6-{u:04d}.flac", n, seed=u)
    (chapter / "5-6.trans.txt").write_text("".join(f"5-6-{u:04d} {t}\n" for u, t in enumerate(texts)))
    # 0.2 s = 21 frames -> 5 CTC frames at subsampling 4, fewer than the 38 labels (+2 repeats: "LL" no, "OO" no)
    dm = LibriSpeechDataModule(root=str(root), batch_size=1, max_duration=2.5, subsampling=4)
    assert dm.train_indices.tolist() == [0, 3, 4]
    facts = dm._description
    assert facts["train_dropped_too_long"] == 1 and facts["train_dropped_unalignable"] == 1
    assert speech.ctc_frames_needed(encode_transcript("BOOK")) == 5 and speech.ctc_frames_needed(np.array([1, 2])) == 2


def test_bad_options_are_config_errors(libri_root):
    root, _ = libri_root
    for options, words in (({"cmvn": "batch"}, "data.cmvn"), ({"n_mels": 0}, "data.n_mels"),
                           ({"batch_size": 0}, "data.batch_size"), ({"batch_size": 999}, "data.batch_size=999"),
                           ({"max_duration": 0}, "data.max_duration"), ({"freq_mask_width": 81}, "freq_mask_width"),
                           ({"utterances_per_epoch": 1, "batch_size": 2}, "utterances_per_epoch"),
                           ({"time_mask_max_fraction": 2.0}, "time_mask_max_fraction"),
                           ({"train": "a/b"}, "data.train")):
        with pytest.raises(ConfigError, match=words):
            LibriSpeechDataModule(root=str(root), **options)
    dm = LibriSpeechDataModule(root=str(root), batch_size=2)
    with pytest.raises(ConfigError, match="probe batch size"):
        dm.probe_batch(99)
    with pytest.raises(ConfigError, match="split must be"):
        dm.transcripts("dev")
    with pytest.raises(ConfigError, match="data.hours"):
        audio.espeak_corpus_dir(hours=0)


def test_data_speech_command_builds_and_prints_the_corpus(tmp_path_factory, monkeypatch, capsys, libri_root):
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(tiny_espeak_cache(tmp_path_factory)))
    assert cli.main(["data", "speech", "--hours", str(TINY_ESPEAK["hours"]),
                     "--eval-minutes", str(TINY_ESPEAK["eval_minutes"])]) == 0
    out = capsys.readouterr().out
    for words in ("corpus     espeak", "PSF-2.0", "espeak-ng", "train-espeak", "dev-espeak", "test-espeak", "took"):
        assert words in out
    root, written = libri_root
    assert cli.main(["data", "speech", "--corpus", "librispeech", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "CC BY 4.0" in out and "train-clean-100" in out and f"{len(written['train-clean-100'])}" in out
    assert cli.main(["data", "speech", "--corpus", "librispeech"]) == 2
    assert "needs --root" in capsys.readouterr().err


def test_utterances_per_epoch_draws_that_many_afresh_each_epoch(libri_root):
    root, _ = libri_root
    dm = LibriSpeechDataModule(root=str(root), batch_size=2, utterances_per_epoch=4, max_duration=100.0,
                               subsampling=1)
    assert len(dm.train_indices) == 16
    loader = dm.train_dataloader()
    epochs = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        epochs.append(sorted(i for b in loader for i in b["index"].tolist()))
    assert [len(e) for e in epochs] == [4, 4, 4] and len({tuple(e) for e in epochs}) > 1
