"""Text data of the LM family: tokenizers, corpora (stdlib, WikiText-103, text files), blocks, resume, errors.

Every stream and block is checked against the text read and encoded here directly (bytes, a word
count with ``collections.Counter``, slicing); WikiText-103 and text files are tiny fake trees in
tmp_path; the stdlib corpus is the running interpreter's, read once. The data cache is a tmp dir.
"""

import hashlib
import os
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sigma_repro import cli
from sigma_repro.data.sampling import EpochPrefixSampler
from sigma_repro.data.text import (
    SPLITS,
    StdlibDataModule,
    TextFilesDataModule,
    WikiText103DataModule,
    hash_split,
    stdlib_corpus,
    stdlib_files,
    text_files_corpus,
    wikitext103_corpus,
)
from sigma_repro.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_path,
)
from sigma_repro.errors import ConfigError

from .helpers import assert_loader_resumes_mid_epoch

CONF_DATA = Path(__file__).resolve().parent.parent / "conf" / "data"
MIXED = "def f(x):\n    return  x + 1\t# tab, two spaces\n\nclass Ä:  # é 😀 中文\n    pass\n"


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch) -> Path:
    cache = tmp_path_factory.mktemp("data_cache")
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(cache))
    return cache


def ascii_text(n_lines: int, seed: int = 0) -> str:
    """Lines of random lower-case words, a few repeated often enough for a word vocabulary."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "x", "=", "(", ")", "return"]
    return "".join(" ".join(rng.choice(words, rng.integers(1, 12))) + "\n" for _ in range(n_lines))


# --- tokenizers --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_is_utf8():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(MIXED)
    assert ids.dtype == np.uint8 and ids.tolist() == list(MIXED.encode("utf-8"))
    assert tokenizer.decode(ids) == MIXED
    assert tokenizer.decode(ids[:-3].tolist() + [0xF0]) == MIXED.encode()[:-3].decode() + "\ufffd"  # a cut character


def test_word_tokenizer_vocabulary_encoding_and_round_trip():
    train = "the cat sat\non the  mat <unk>\n\nthe end"
    tokenizer = WordTokenizer.fit([train])
    counts = Counter(w for w in train.split() if w != "<unk>")
    assert tokenizer.words == ["<unk>", "<eos>", *sorted(counts, key=lambda w: (-counts[w], w))]
    assert tokenizer.words[2] == "the"
    index = {w: i for i, w in enumerate(tokenizer.words)}
    expected = [index.get(w, 0) for line in train.split("\n") for w in [*line.split(), "<eos>"]]
    assert tokenizer.encode(train).tolist() == expected  # a last line without "\n" still ends with <eos>
    assert tokenizer.decode(tokenizer.encode(train)) == "the cat sat\non the mat <unk>\n\nthe end\n"
    assert tokenizer.decode(tokenizer.encode("the dog\n")) == "the <unk>\n"  # unseen word -> <unk>
    assert tokenizer.encode("<unk>").tolist() == [0, 1]  # WikiText's own <unk> is id 0
    assert WordTokenizer.from_bytes(tokenizer.to_bytes()).words == tokenizer.words
    assert WordTokenizer.fit([train], max_vocab_size=4).words == ["<unk>", "<eos>", "the", "cat"]


def test_sentencepiece_round_trip_bytes_per_token_and_deterministic_model(data_cache):
    text = ascii_text(400) + MIXED * 20
    first = SentencePieceTokenizer.train([text], 300)
    assert SentencePieceTokenizer.train([text], 300) == first  # the same bytes for the same text
    tokenizer = build_tokenizer("sentencepiece", corpus_id="fake-0123", training_texts=[text], vocab_size=300)
    assert tokenizer_path("sentencepiece", "fake-0123-bpe300").read_bytes() == first
    assert load_tokenizer("sentencepiece", "fake-0123-bpe300").model_proto == first  # loaded by name
    assert tokenizer.vocab_size == 300
    unseen = "ünïcode ☃ never seen\r\n\ttabs  and   spaces\n"  # byte fallback: never <unk>
    for sample in (text, MIXED, unseen, ""):
        ids = tokenizer.encode(sample)
        assert tokenizer.decode(ids) == sample
        assert SentencePieceTokenizer.UNK_ID not in ids.tolist()
        assert tokenizer.token_bytes()[ids].sum() == len(sample.encode("utf-8"))
    lines = text.splitlines(keepends=True)  # "\n" is a piece of its own: line by line = whole
    assert np.concatenate([tokenizer.encode(line) for line in lines]).tolist() == tokenizer.encode(text).tolist()


def test_tokenizer_options_and_cache_files_are_checked(data_cache):
    for kind, vocab_size, match in (("bpe", None, "bytes, words, sentencepiece"), ("bytes", 300, "256"),
                                    ("words", 2, ">= 3"), ("sentencepiece", 100, ">= 262"),
                                    ("sentencepiece", 300.0, ">= 262")):
        with pytest.raises(ConfigError, match=match):
            build_tokenizer(kind, corpus_id="c-1", training_texts=["a b\n"], vocab_size=vocab_size)
    with pytest.raises(ConfigError, match=r"Vocabulary size too high .*data.vocab_size"):
        build_tokenizer("sentencepiece", corpus_id="c-1", training_texts=["tiny text\n"], vocab_size=5000)
    with pytest.raises(ConfigError, match="sigma-repro data lm"):
        load_tokenizer("sentencepiece", "c-1-bpe999")
    broken = tokenizer_path("sentencepiece", "c-1-bpe999")
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="Delete it"):
        load_tokenizer("sentencepiece", "c-1-bpe999")


# --- corpora -----------------------------------------------------------------------------------


def test_hash_split_is_a_function_of_the_name_alone():
    names = [f"pkg{i % 7}/module_{i}.py" for i in range(4000)]
    for name in names[:50]:
        u = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64
        assert hash_split(name) == ("valid" if u < 0.05 else "test" if u < 0.10 else "train")
    shares = Counter(map(hash_split, names))
    assert abs(shares["valid"] / 4000 - 0.05) < 0.015 and abs(shares["test"] / 4000 - 0.05) < 0.015
    # fixed forever: a change here silently changes every corpus split by hash
    assert [hash_split(n) for n in ("chunk.py", "calendar.py", "token.py", "argparse.py")] == [
        "valid", "test", "valid", "train"]


STDLIB_KEPT = ["os.py", "json/__init__.py", "json/decoder.py", "email/mime/text.py", "venv/__init__.py",
               "encodings/utf_8.py", "zz_last.py", "a_first.py", "tests_helper.py", "ctypes/util.py"]
STDLIB_LEFT_OUT = ["site-packages/numpy/__init__.py", "dist-packages/apt/__init__.py", "test/test_os.py",
                   "unittest/test/test_case.py", "json/tests/x.py", "idlelib/idle_test/t.py", "idlelib/run.py",
                   "tkinter/__init__.py", "turtledemo/clock.py", "lib2to3/main.py", "distutils/core.py",
                   "ensurepip/__init__.py", "lib-dynload/x.py", "pydoc_data/topics.py", "config-3.11-x86_64-linux-gnu/"
                   "python-config.py", "_sysconfigdata__linux_x86_64-linux-gnu.py", "ctypes/macholib/dyld.py",
                   "turtle.py", "site.py", "sysconfig.py", "sitecustomize.py", "_distutils_system_mod.py",
                   "__pycache__/os.py", "json/__pycache__/x.py", "README.txt", "json/data.json"]


def fake_stdlib(root: Path, order: list[str]) -> None:
    for name in order:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\nvalue = {len(name)}\n", encoding="utf-8")


def test_stdlib_file_list_leaves_out_distro_parts_and_ignores_listing_order(tmp_path):
    every = STDLIB_KEPT + STDLIB_LEFT_OUT
    fake_stdlib(tmp_path / "a", every)
    fake_stdlib(tmp_path / "b", every[::-1])  # created in the other order: listed in another order
    assert stdlib_files(tmp_path / "a") == stdlib_files(tmp_path / "b") == sorted(STDLIB_KEPT)
    a, b = stdlib_corpus(tmp_path / "a"), stdlib_corpus(tmp_path / "b")
    assert a.sha256 == b.sha256 and a.documents == b.documents
    for split in SPLITS:
        names = sorted(n for n in STDLIB_KEPT if hash_split(n) == split)
        assert a.documents[split] == [(tmp_path / "a" / n).read_text() for n in names]
    every_text = "".join((tmp_path / "a" / n).read_text() for s in SPLITS
                         for n in sorted(n for n in STDLIB_KEPT if hash_split(n) == s))
    assert a.sha256 == hashlib.sha256(every_text.encode()).hexdigest()
    (tmp_path / "a" / "new_module.py").write_text("x = 1\n")  # a new file moves no other file's split
    c = stdlib_corpus(tmp_path / "a")
    assert all(set(a.documents[s]) <= set(c.documents[s]) for s in SPLITS)


def test_stdlib_corpus_of_this_interpreter_matches_a_direct_read():
    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = stdlib_corpus()
    left_out_dirs = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"}
    left_out_top = {"idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "lib-dynload",
                    "pydoc_data", "turtle.py", "site.py", "sysconfig.py", "sitecustomize.py",
                    "_distutils_system_mod.py"}
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not left_out_dirs & set(p.relative_to(root).parts[:-1])
                   and p.relative_to(root).parts[0] not in left_out_top
                   and not p.relative_to(root).parts[0].startswith(("config-", "_sysconfigdata"))
                   and not p.relative_to(root).as_posix().startswith("ctypes/macholib/"))
    assert stdlib_files(root) == names and len(names) > 400
    by_split = {s: [n for n in names if hash_split(n) == s] for s in SPLITS}
    texts = {s: b"".join((root / n).read_bytes() for n in by_split[s]) for s in SPLITS}
    facts = corpus.describe()
    assert facts["bytes"] == {s: len(texts[s]) for s in SPLITS}
    assert facts["sha256"] == hashlib.sha256(b"".join(texts[s] for s in SPLITS)).hexdigest()
    assert facts["files"] == {s: len(by_split[s]) for s in SPLITS}
    assert facts["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert facts["licence"] == "PSF-2.0" and 5e6 < sum(facts["bytes"].values()) < 2e7
    distro = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    if distro.is_dir() and distro.resolve() != root.resolve():  # e.g. Debian's build beside this one
        assert stdlib_files(distro) == names


WIKI = {
    "train": " \n = Valkyria Chronicles = \n \n The game was <unk> in 2011 , and the game sold well . \n"
             " \n = = Plot = = \n \n The story follows the squad . \n" * 30,
    "valid": " \n = Robert Boulter = \n \n Boulter is an English actor . \n" * 10,
    "test": " \n = Tower Building = \n \n The building is a <unk> tower . \n" * 10,
}


def fake_wikitext(directory: Path, suffix: str, texts: dict[str, str] = WIKI) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (directory / f"wiki.{split}.{suffix}").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("layout", ["tokens", "raw"])
@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_wikitext_layouts_and_word_streams(tmp_path, layout, point_at):
    folder = tmp_path / ("wikitext-103" if layout == "tokens" else "wikitext-103-raw")
    fake_wikitext(folder, layout)
    dm = WikiText103DataModule(root=str(tmp_path if point_at == "parent" else folder), block_size=8, batch_size=4)
    counts = Counter(w for w in WIKI["train"].split() if w != "<unk>")
    vocabulary = ["<unk>", "<eos>", *sorted(counts, key=lambda w: (-counts[w], w))]
    index = {w: i for i, w in enumerate(vocabulary)}
    assert dm.model_kwargs == {"vocab_size": len(vocabulary), "max_seq_len": 8}
    assert dm.task_kwargs == {"bytes_per_token": None}  # words lose whitespace: no bits per byte
    for split, blocks in (("train", dm.train_set), ("valid", dm.val_set), ("test", dm.test_set)):
        stream = [index.get(w, 0) for line in WIKI[split].split("\n")[:-1] for w in [*line.split(), "<eos>"]]
        assert dm.describe()["tokens"][split] == len(stream)
        for i in range(len(blocks)):
            s = int(blocks.starts[i])
            inputs, targets = blocks[i]
            assert inputs.tolist() == stream[s:s + 8] and targets.tolist() == stream[s + 1:s + 9]
    facts = dm.describe()
    assert facts["corpus"] == ("wikitext103" if layout == "tokens" else "wikitext103_raw")
    assert facts["licence"] == "CC BY-SA 3.0" and facts["layout"] == layout and facts["tokenizer"] == "words"


def test_wikitext_bad_trees_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no such dir.*wikitext-103-v1.zip"):
        wikitext103_corpus(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"wiki\.\{train,valid,test\}\.tokens.*found an empty dir"):
        wikitext103_corpus(tmp_path)
    fake_wikitext(tmp_path / "partial" / "wikitext-103", "tokens")
    (tmp_path / "partial" / "wikitext-103" / "wiki.test.tokens").unlink()
    with pytest.raises(ConfigError, match=r"incomplete.*not wiki\.test\.tokens"):
        wikitext103_corpus(tmp_path / "partial")
    fake_wikitext(tmp_path / "empty", "tokens", {**WIKI, "valid": " \n \n"})
    with pytest.raises(ConfigError, match=r"wiki\.valid\.tokens is empty"):
        wikitext103_corpus(tmp_path / "empty")
    fake_wikitext(tmp_path / "latin1", "raw")
    (tmp_path / "latin1" / "wiki.train.raw").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"wiki\.train\.raw is not UTF-8: byte 3 \(0xe9\)"):
        wikitext103_corpus(tmp_path / "latin1")
    fake_wikitext(tmp_path / "small", "tokens")
    with pytest.raises(ConfigError, match=r"block_size=500 needs 501 tokens.*valid split.*has 140"):
        WikiText103DataModule(root=str(tmp_path / "small"), block_size=500)


# --- text files, blocks and the loaders ---------------------------------------------------------


def expected_parts(text: str) -> list[str]:
    """The documented within-file split, computed here: cuts after the newline at/after 90% and 95%."""
    cuts = []
    for fraction in (0.9, 0.95):
        position = round(fraction * len(text))
        newline = text.find("\n", position)
        cuts.append(newline + 1 if newline >= 0 else position)
    return [text[:cuts[0]], text[cuts[0]:cuts[1]], text[cuts[1]:]]


def test_text_files_split_within_files_in_path_order(tmp_path):
    texts = {"b.txt": ascii_text(300, seed=1), "a.txt": ascii_text(200, seed=2) + MIXED, "sub/c.txt": "one line"}
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    corpus = text_files_corpus([str(tmp_path / "b.txt"), str(tmp_path / "sub"), str(tmp_path / "a.txt")])
    again = text_files_corpus([str(tmp_path)])  # the dir: every *.txt under it, the same files
    for split_index, split in enumerate(SPLITS):
        parts = [expected_parts(texts[name])[split_index] for name in ("a.txt", "b.txt", "sub/c.txt")]
        assert corpus.documents[split] == again.documents[split] == parts
    assert [corpus.documents[s][2] for s in SPLITS] == ["one lin", "e", ""]  # no newline: cut at 90%, 95%


def test_blocks_are_shifted_slices_of_the_byte_stream(tmp_path):
    text = ascii_text(600) + MIXED * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    dm = TextFilesDataModule(paths=[str(tmp_path / "t.txt")], block_size=16, batch_size=4, val_blocks=7)
    streams = [np.frombuffer(part.encode(), np.uint8) for part in expected_parts(text)]
    assert len(dm.train_set) == (len(streams[0]) - 1) // 16
    for i in range(len(dm.train_set)):
        inputs, targets = dm.train_set[i]
        assert inputs.dtype == torch.int64 and inputs.shape == targets.shape == (16,)
        assert inputs.tolist() == streams[0][16 * i:16 * i + 16].tolist()
        assert targets.tolist() == streams[0][16 * i + 1:16 * i + 17].tolist()
    n_valid = (len(streams[1]) - 1) // 16
    chosen = np.unique(np.linspace(0, n_valid - 1, 7).round().astype(int))
    val_inputs, val_targets = (torch.cat(x) for x in zip(*dm.val_dataloader()))
    assert val_inputs.tolist() == [streams[1][16 * b:16 * b + 16].tolist() for b in chosen]
    assert val_targets.tolist() == [streams[1][16 * b + 1:16 * b + 17].tolist() for b in chosen]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    order = [index for index, _ in loader.sampler.epoch_keys()]
    first_inputs, first_targets = next(iter(loader))
    assert first_inputs.shape == (4, 16)
    assert first_inputs.tolist() == [streams[0][16 * b:16 * b + 16].tolist() for b in order[:4]]
    assert torch.equal(first_targets[:, :-1], first_inputs[:, 1:])
    assert dm.model_kwargs == {"vocab_size": 256, "max_seq_len": 16}
    assert dm.task_kwargs == {"bytes_per_token": 1.0}
    probe = dm.probe_batch(3)
    assert probe.shape == (3, 16) and torch.equal(probe, val_inputs[[0, 3, 6]])


def test_sentencepiece_bytes_per_token_is_measured_on_the_validation_targets(tmp_path):
    text = ascii_text(3000)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    dm = TextFilesDataModule(paths=[str(tmp_path / "t.txt")], tokenizer="sentencepiece", vocab_size=300,
                             block_size=32, batch_size=8)
    decoded = sum(len(dm.tokenizer.decode(dm.val_set[i][1]).encode()) for i in range(len(dm.val_set)))
    assert dm.task_kwargs["bytes_per_token"] == pytest.approx(decoded / (32 * len(dm.val_set)), rel=1e-12)
    assert 1.5 < dm.task_kwargs["bytes_per_token"] < 6
    assert dm.model_kwargs == {"vocab_size": 300, "max_seq_len": 32}
    valid_text = expected_parts(text)[1]
    stream = dm.val_set.tokens  # the whole valid split, not only its blocks
    assert dm.tokenizer.decode(stream) == valid_text and len(stream) == dm.describe()["tokens"]["valid"]


def epoch_batches(dm, epoch: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [inputs for inputs, _ in loader]


@pytest.mark.parametrize("blocks_per_epoch", [None, 40])
def test_train_loader_resumes_mid_epoch_exactly(tmp_path, blocks_per_epoch):
    (tmp_path / "t.txt").write_text(ascii_text(800), encoding="utf-8")
    make = lambda seed: TextFilesDataModule(paths=[str(tmp_path / "t.txt")], block_size=16, batch_size=4,  # noqa: E731
                                            seed=seed, blocks_per_epoch=blocks_per_epoch)
    dm = make(0)
    uninterrupted = epoch_batches(dm, 2)
    assert len(uninterrupted) == (blocks_per_epoch or len(dm.train_set)) // 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, epoch_batches(make(0), 2)))
    assert not torch.equal(torch.cat(uninterrupted), torch.cat(epoch_batches(make(1), 2)[:len(uninterrupted)]))
    assert not torch.equal(torch.cat(uninterrupted), torch.cat(epoch_batches(dm, 3)))

    assert_loader_resumes_mid_epoch(lambda: make(0).train_dataloader(), epoch=2, after=5, key=lambda b: b[0])


def test_blocks_per_epoch_is_the_head_of_each_epochs_permutation_sharded_over_ranks():
    whole = EpochPrefixSampler(1000, per_epoch=1000, seed=3)
    shards = [EpochPrefixSampler(1000, per_epoch=90, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for epoch in (0, 5):
        for sampler in (whole, *shards):
            sampler.set_epoch(epoch)
        permutation = [i for i, _ in whole.epoch_keys()]
        taken = [[i for i, _ in s.epoch_keys()] for s in shards]
        assert all(len(t) == len(s) == 30 for t, s in zip(taken, shards))
        assert sorted(i for t in taken for i in t) == sorted(permutation[:90])
    assert permutation != list(range(1000)) and len(set(permutation)) == 1000


def test_probe_batch_and_validation_blocks_do_not_depend_on_the_seed(tmp_path):
    (tmp_path / "t.txt").write_text(ascii_text(2000), encoding="utf-8")
    a, b = (TextFilesDataModule(paths=[str(tmp_path / "t.txt")], block_size=16, batch_size=4, seed=s, val_blocks=20)
            for s in (0, 1))
    assert torch.equal(a.probe_batch(8), b.probe_batch(8)) and a.probe_batch(8).shape == (8, 16)
    assert np.array_equal(a.val_set.starts, b.val_set.starts) and len(a.val_set) == 20
    with pytest.raises(ConfigError, match=r"probe batch size.*20 validation blocks"):
        a.probe_batch(21)


def test_tokenized_streams_are_cached_by_corpus_and_tokenizer_hash(tmp_path, data_cache):
    (tmp_path / "t.txt").write_text(ascii_text(1000), encoding="utf-8")
    options = dict(paths=[str(tmp_path / "t.txt")], tokenizer="words", block_size=8, batch_size=4)
    first = TextFilesDataModule(**options)
    files = sorted(p.relative_to(data_cache).as_posix() for p in data_cache.rglob("*") if p.is_file())
    corpus_id, tokenizer_sha = first.describe()["sha256"][:16], first.describe()["tokenizer_sha256"][:16]
    streams = [f"tokens/text_files-{corpus_id}/words-{tokenizer_sha}/{s}.npy" for s in ("test", "train", "valid")]
    assert files == [*streams, f"words/text_files-{corpus_id}-words.vocab"]
    second = TextFilesDataModule(**options)  # read back from the cache
    assert np.array_equal(first.train_set.tokens, second.train_set.tokens)
    assert isinstance(second.train_set.tokens, np.memmap)


def test_describe_records_what_makes_two_runs_see_the_same_data(tmp_path):
    text = ascii_text(500)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    facts = TextFilesDataModule(paths=[str(tmp_path / "t.txt")], block_size=16, batch_size=4).describe()
    parts = expected_parts(text)
    assert facts["sha256"] == hashlib.sha256(text.encode()).hexdigest()  # the splits in order are the file
    assert facts["bytes"] == facts["tokens"] == {s: len(p.encode()) for s, p in zip(SPLITS, parts)}
    assert (facts["tokenizer"], facts["vocab_size"], facts["block_size"]) == ("bytes", 256, 16)
    assert facts["train_blocks"] == facts["blocks_per_epoch"] == (len(parts[0]) - 1) // 16


def test_bad_text_inputs_and_options_are_config_errors(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(ascii_text(400), encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("naïve\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "no_txt" / "notes.md").write_text("x\n")
    for paths, match in (([], "data.paths is empty"), ([str(tmp_path / "nope.txt")], "does not exist"),
                         ([str(tmp_path / "latin1.txt")], r"not UTF-8: byte 2 \(0xef\)"),
                         ([str(tmp_path / "empty.txt")], "is empty"),
                         ([str(tmp_path / "no_txt")], r"holds no \*\.txt file")):
        with pytest.raises(ConfigError, match=match):
            TextFilesDataModule(paths=paths)
    for options, match in (({"tokenizer": "chars"}, "data.tokenizer must be one of"),
                           ({"vocab_size": 512}, "for tokenizer=bytes must be null or 256"),
                           ({"block_size": 1}, "data.block_size must be a whole number >= 2"),
                           ({"block_size": 64.0}, "data.block_size must be a whole number"),
                           ({"batch_size": 0}, "data.batch_size must be a whole number >= 1"),
                           ({"num_workers": -1}, "data.num_workers"),
                           ({"val_blocks": 0}, r"data.val_blocks must be a whole number >= 1 \(or null"),
                           ({"block_size": 512}, r"block_size=512 needs 513 tokens.*valid split"),
                           ({"block_size": 16, "batch_size": 5000}, "more than the .* training blocks"),
                           ({"block_size": 16, "batch_size": 8, "blocks_per_epoch": 4}, "blocks_per_epoch must be"),
                           ({"block_size": 16, "batch_size": 8, "blocks_per_epoch": 10**6}, "blocks_per_epoch must")):
        with pytest.raises(ConfigError, match=match):
            TextFilesDataModule(paths=[str(good)], **options)
    with pytest.raises(ConfigError, match="No Python standard library source under"):
        StdlibDataModule(root=str(tmp_path / "no_txt"))


# --- configs and the command -------------------------------------------------------------------


def test_data_configs_instantiate_with_their_documented_defaults(tmp_path):
    fake_wikitext(tmp_path / "wikitext-103", "tokens")
    (tmp_path / "t.txt").write_text(ascii_text(400), encoding="utf-8")
    stdlib = instantiate(OmegaConf.load(CONF_DATA / "stdlib.yaml"), seed=0)
    facts = stdlib.describe()
    assert (facts["block_size"], stdlib.batch_size, facts["blocks_per_epoch"]) == (128, 32, 256)
    assert facts["val_blocks"] == 128 >= 64  # the diagnostics' default probe_size fits
    assert facts["train_blocks"] == (facts["bytes"]["train"] - 1) // 128 and facts["bytes_per_token"] == 1.0
    assert len(stdlib.train_dataloader()) == 256 // 32
    wikitext = OmegaConf.load(CONF_DATA / "wikitext103.yaml")
    wikitext.root, wikitext.block_size, wikitext.batch_size = str(tmp_path), 8, 4
    assert instantiate(wikitext, seed=0).describe()["tokenizer"] == "words"
    text_files = OmegaConf.load(CONF_DATA / "text_files.yaml")
    text_files.paths = [str(tmp_path / "t.txt")]
    assert instantiate(text_files, seed=0).describe()["corpus"] == "text_files"


def test_data_lm_command_builds_the_tokenizer_and_prints_size_source_licence(tmp_path, data_cache, capsys):
    (tmp_path / "t.txt").write_text(ascii_text(1500), encoding="utf-8")
    assert cli.main(["data", "lm", "--corpus", "text_files", "--paths", str(tmp_path / "t.txt"),
                     "--vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    corpus = text_files_corpus([str(tmp_path / "t.txt")])
    assert all(f"{corpus.bytes[split]:,}" in out for split in SPLITS)
    assert "licence    the files' own" in out and corpus.sha256 in out and "vocabulary 300" in out
    assert tokenizer_path("sentencepiece", f"{corpus.corpus_id}-bpe300").is_file()
    assert cli.main(["data", "lm", "--corpus", "wikitext103"]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert cli.main(["data", "lm", "--corpus", "wikitext103", "--root", str(tmp_path / "nope")]) == 2
    assert "wikitext-103-v1.zip" in capsys.readouterr().err


def test_data_lm_command_on_wikitext_prints_cc_by_sa(tmp_path, capsys):
    fake_wikitext(tmp_path / "wikitext-103", "tokens")
    assert cli.main(["data", "lm", "--corpus", "wikitext103", "--root", str(tmp_path), "--tokenizer", "words"]) == 0
    out = capsys.readouterr().out
    assert "CC BY-SA 3.0" in out and "layout     tokens" in out and "WikiText-103" in out
    assert os.environ["SIGMA_REPRO_DATA"] in out
