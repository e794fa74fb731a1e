"""Translation data: gettext catalogs (filters, plural/msgctxt, split, prepared cache), WMT raw text,
sacrebleu test sets offline, the synthetic task, batches, resume, the command and bad input.

Catalogs are tiny .mo files written here byte by byte (``write_mo``: the GNU format is a header,
two tables of (length, offset) and the NUL-terminated strings), so no msgfmt is needed. Every
expectation is computed here from the entries written (which rule each one breaks is decided by
hand, not by the code under test); the data cache and $SACREBLEU are tmp dirs.
"""

import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sigma_repro import cli
from sigma_repro.data import parallel
from sigma_repro.data.parallel import (
    SPLITS,
    GettextDataModule,
    SyntheticTranslationDataModule,
    WmtDataModule,
    gettext_corpus,
    read_gettext_pairs,
    synthetic_corpus,
    synthetic_vocabularies,
    wmt_corpus,
)
from sigma_repro.data.text import hash_split
from sigma_repro.errors import ConfigError

from .helpers import assert_loader_resumes_mid_epoch

CONF_DATA = Path(__file__).resolve().parent.parent / "conf" / "data"
VOCAB = 340  # sentencepiece pieces for the tiny corpora here (>= 262 + their alphabet)


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch) -> Path:
    cache = tmp_path_factory.mktemp("data_cache")
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(cache))
    monkeypatch.setenv("SACREBLEU", str(tmp_path_factory.mktemp("sacrebleu")))
    return cache


# --- fake catalogs -------------------------------------------------------------------------------

HEADER = "Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"


def write_mo(path: Path, entries: dict[str, str], *, charset: str = "UTF-8", header: str | None = None) -> None:
    """A GNU .mo catalog of ``entries`` (msgid -> msgstr; plural: "one\\0many" -> "form0\\0form1";
    context: "ctx\\x04msgid"), encoded in ``charset``: magic, revision 0, N, the offsets of the msgid
    and msgstr tables, an empty hash table, then the strings, each NUL-terminated."""
    header = HEADER.format(charset=charset) if header is None else header
    items = sorted([(b"", header.encode(charset))] + [(k.encode(charset), v.encode(charset))
                                                       for k, v in entries.items()])
    n = len(items)
    offset, tables, data = 28 + 16 * n, ([], []), b""
    for column in (0, 1):
        for item in items:
            tables[column].append(struct.pack("<2I", len(item[column]), offset))
            data += item[column] + b"\0"
            offset += len(item[column]) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 28 + 16 * n)
                     + b"".join(tables[0]) + b"".join(tables[1]) + data)


EN = ["the", "file", "could", "not", "be", "opened", "directory", "is", "empty", "user", "name", "invalid",
      "missing", "option", "value", "cannot", "read", "write", "server", "connection", "new", "old"]
DE = ["die", "Datei", "konnte", "nicht", "werden", "geöffnet", "Verzeichnis", "ist", "leer", "Benutzer",
      "Benennung", "ungültig", "fehlend", "Schalter", "Wert", "kann", "lesen", "schreiben", "Dienst",
      "Verbindung", "neu", "alt"]


def random_pairs(n: int, seed: int) -> dict[str, str]:
    """``n`` distinct English sentences of 3-9 words and their word-by-word German, reversed: no word of a
    target is in its source, so none is a copy, short, untranslated or placeholder."""
    rng, pairs = np.random.default_rng(seed), {}
    while len(pairs) < n:
        words = rng.integers(0, len(EN), rng.integers(3, 10))
        pairs[" ".join(EN[w] for w in words)] = " ".join(DE[w] for w in words[::-1])
    return pairs


def fake_locale(root: Path, catalogs: dict[str, dict[str, str]], language: str = "de") -> Path:
    for name, entries in catalogs.items():
        write_mo(root / language / "LC_MESSAGES" / name, entries)
    return root


@pytest.fixture
def locale_dir(tmp_path) -> Path:
    """Three catalogs of 250 distinct random pairs each (some sources shared between them)."""
    return fake_locale(tmp_path / "locale", {f"pkg{i}.mo": random_pairs(250, seed=i) for i in range(3)})


def expected_gettext(catalogs: dict[str, dict[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The split of clean random pairs, computed here: catalogs by name, entries sorted, first source wins."""
    splits, seen = {s: [] for s in SPLITS}, set()
    for name in sorted(catalogs):
        for source, target in sorted(catalogs[name].items()):
            if source not in seen:
                seen.add(source)
                splits[hash_split(source)].append((source, target))
    return splits


# --- gettext: filters, plural and msgctxt, charsets ------------------------------------------------

LONG_50 = " ".join(["value"] * 50)
CATALOG_A = {
    "Open file": "Datei öffnen",                                              # short_source
    "This is untranslated text": "This is untranslated text",                  # untranslated
    "cannot open %s now": "kann %s jetzt nicht öffnen",                         # placeholder: printf
    "use %1$s and then %2$d": "erst %1$s und dann %2$d",                        # placeholder: positional
    "%(name)s is not known": "%(name)s ist unbekannt",                           # placeholder: python
    "value {0} is wrong here": "Wert {0} ist hier falsch",                      # placeholder: brace
    "hello {user} and welcome": "hallo {user} und willkommen",                  # placeholder: named brace
    "set ${HOME} first please": "bitte zuerst ${HOME} setzen",                   # placeholder: shell
    "Rename the file now": "Benenne die Datei in $NAME um",                      # placeholder in the target only
    "we are 50% sure about it": "wir sind zu 50% sicher",                        # kept: prose percent
    "Cheshire West and Chester": "Cheshire West und Chester",                    # copy: 3 of 4 target words
    "open Shell Server right now": "Shell Server sofort öffnen",                  # kept: exactly half copied
    "::: --- !!!": "... ??? ...",                                                 # copy: a target without words
    "value " + LONG_50: "Wert " + LONG_50.replace("value", "Wert"),             # long: 51 words
    LONG_50: LONG_50.replace("value", "Wert"),                                   # kept: 50 words
    "one file was removed\0many files were removed": "eine Datei wurde entfernt\0viele Dateien wurden entfernt",
    "menu\x04Save the file now": "Datei jetzt speichern",                        # kept without its context
    "Line one\n  continues   here": "Zeile eins\n geht\thier weiter",           # kept, whitespace collapsed
    "the shared sentence here": "der geteilte Satz hier",                        # kept (a.mo comes first)
}
CATALOG_B = {"the shared sentence here": "ein anderer Satz hier",             # duplicate
             "Save the file now": "Speichere die Datei jetzt"}                   # duplicate of the msgctxt one
KEPT = {("we are 50% sure about it", "wir sind zu 50% sicher"),
        ("open Shell Server right now", "Shell Server sofort öffnen"),
        (LONG_50, LONG_50.replace("value", "Wert")),
        ("one file was removed", "eine Datei wurde entfernt"),
        ("Save the file now", "Datei jetzt speichern"),
        ("Line one continues here", "Zeile eins geht hier weiter"),
        ("the shared sentence here", "der geteilte Satz hier")}


def test_each_filter_rule_is_applied_and_counted(tmp_path):
    fake_locale(tmp_path, {"a.mo": CATALOG_A, "b.mo": CATALOG_B})
    splits, facts = read_gettext_pairs(sorted((tmp_path / "de" / "LC_MESSAGES").glob("*.mo")))
    kept = [pair for split in SPLITS for pair in splits[split]]
    assert set(kept) == KEPT and len(kept) == len(KEPT)
    assert all(hash_split(source) == split for split in SPLITS for source, _ in splits[split])
    assert facts["filters"] == {"plural_form": 1, "short_source": 1, "untranslated": 1, "placeholder": 7, "copy": 2,
                                "long": 1, "duplicate": 2}
    assert facts["pairs_per_catalog"] == {"a.mo": len(KEPT), "b.mo": 0}
    # every entry but the header is kept or counted once (a plural entry gives two: form 0 and form 1)
    assert facts["catalog_entries"] == {"a.mo": len(CATALOG_A) + 1, "b.mo": len(CATALOG_B)}
    assert sum(facts["filters"].values()) + len(kept) == len(CATALOG_A) + 1 + len(CATALOG_B)
    assert facts["skipped_catalogs"] == {} and facts["non_utf8_catalogs"] == {}


def test_catalogs_in_other_charsets_are_decoded_or_skipped_and_reported(tmp_path):
    catalog_dir = tmp_path / "de" / "LC_MESSAGES"
    write_mo(catalog_dir / "latin.mo", {"the size is wrong": "die Größe ist falsch"}, charset="ISO-8859-1")
    write_mo(catalog_dir / "bad_header.mo", {"the size is wrong": "die Größe ist falsch"}, charset="ISO-8859-1",
             header="Last-Translator: Ralf Bächle\nContent-Type: text/plain; charset=ISO-8859-1\n")
    write_mo(catalog_dir / "unknown.mo", {"the size is wrong": "die Größe ist falsch"}, charset="UTF-8",
             header="Content-Type: text/plain; charset=NO-SUCH-CHARSET\n")
    (catalog_dir / "not_a_catalog.mo").write_bytes(b"# a .po file by mistake\n")
    splits, facts = read_gettext_pairs(sorted(catalog_dir.glob("*.mo")))
    assert [pair for split in SPLITS for pair in splits[split]] == [("the size is wrong", "die Größe ist falsch")]
    assert facts["non_utf8_catalogs"] == {"latin.mo": "ISO-8859-1"} and facts["pairs_per_catalog"] == {"latin.mo": 1}
    assert set(facts["skipped_catalogs"]) == {"bad_header.mo", "unknown.mo", "not_a_catalog.mo"}
    assert facts["skipped_catalogs"]["bad_header.mo"].startswith("UnicodeDecodeError")
    assert facts["skipped_catalogs"]["unknown.mo"].startswith("LookupError")
    assert "Bad magic number" in facts["skipped_catalogs"]["not_a_catalog.mo"]
    assert facts["catalogs_read"] == 1


# --- gettext: split, prepared cache, too few pairs ---------------------------------------------------


def prepared_files(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def test_split_is_by_source_hash_and_the_prepared_cache_is_byte_identical(tmp_path, locale_dir, data_cache,
                                                                            monkeypatch):
    catalogs = {f"pkg{i}.mo": random_pairs(250, seed=i) for i in range(3)}
    expected = expected_gettext(catalogs)
    corpus = gettext_corpus(locale_dir, min_pairs=1)
    for split in SPLITS:
        assert list(zip(corpus.sources[split], corpus.targets[split])) == expected[split]
    assert 0 < corpus.pairs["valid"] < corpus.pairs["train"] and 0 < corpus.pairs["test"]
    every = "".join(f"{s}\t{t}\n" for split in SPLITS for s, t in expected[split])
    assert corpus.sha256 == hashlib.sha256(every.encode()).hexdigest()
    unique = len({s for entries in catalogs.values() for s in entries})
    assert corpus.facts["filters"]["duplicate"] == sum(map(len, catalogs.values())) - unique
    assert corpus.facts["pairs_per_catalog"]["pkg0.mo"] == 250  # the first catalog loses nothing to duplicates

    first = prepared_files(data_cache)
    [directory] = {Path(name).parent for name in first}
    assert sorted(Path(name).name for name in first) == sorted(
        ["manifest.json"] + [f"{s}.{lang}" for s in SPLITS for lang in ("en", "de")])
    assert first[f"{directory}/valid.de"].decode() == "".join(f"{t}\n" for _, t in expected["valid"])
    manifest = json.loads(first[f"{directory}/manifest.json"])
    assert manifest["sha256"] == corpus.sha256 and manifest["pairs"] == corpus.pairs
    other = tmp_path / "other_cache"
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(other))
    gettext_corpus(locale_dir, min_pairs=1)
    assert prepared_files(other) == first  # the same bytes, built again

    def no_parsing(*args, **kwargs):
        raise AssertionError("the catalogs were parsed again")

    monkeypatch.setattr(parallel, "read_gettext_pairs", no_parsing)
    assert gettext_corpus(locale_dir, min_pairs=1).sha256 == corpus.sha256  # read back from the cache
    (other / directory / "valid.de").write_text("tampered\n")
    with pytest.raises(ConfigError, match="Delete the dir"):
        gettext_corpus(locale_dir, min_pairs=1)
    monkeypatch.undo()
    write_mo(locale_dir / "de" / "LC_MESSAGES" / "pkg9.mo", random_pairs(5, seed=9))  # new catalog: prepared anew
    again = gettext_corpus(locale_dir, min_pairs=1)
    assert again.facts["prepared"] != corpus.facts["prepared"] and again.facts["catalogs_read"] == 4
    assert set(corpus.sources["test"]) <= set(again.sources["test"])  # nothing moved split


def test_too_few_pairs_says_how_many_and_which_package_adds_more(tmp_path, locale_dir, data_cache):
    with pytest.raises(ConfigError) as error:
        gettext_corpus(locale_dir, min_pairs=5000)
    found = len({s for i in range(3) for s in random_pairs(250, seed=i)})
    message = str(error.value)
    assert f"Only {found:,} usable English->de sentence pairs" in message and "3 catalogs read" in message
    assert "gcc-12-locales" in message and "data.min_pairs=5000" in message and "path-exclude" in message
    prepared = sorted((data_cache / "translation").iterdir())
    assert len(prepared) == 1  # too few, but prepared: a lower data.min_pairs reads it back
    with pytest.raises(ConfigError, match=r"Only 0 usable .* \(0 catalogs read\)"):
        gettext_corpus(tmp_path / "no_locale")
    assert sorted((data_cache / "translation").iterdir()) == prepared  # nothing to prepare: nothing written


def test_system_catalogs_when_installed():
    catalog_dir = Path("/usr/share/locale/de/LC_MESSAGES")
    if not sorted(catalog_dir.glob("*.mo")):
        pytest.skip(f"no gettext catalogs in {catalog_dir} (a minimised image, or no German language files)")
    corpus = gettext_corpus(min_pairs=1)
    facts = corpus.describe()
    total = sum(facts["pairs"].values())
    print(f"\nsystem catalogs: {facts['pairs']} ({total} pairs) from {facts['catalogs_read']} catalogs; "
          f"filters {facts['filters']}; skipped {list(facts['skipped_catalogs'])}")
    assert sum(facts["pairs_per_catalog"].values()) == total
    assert abs(facts["pairs"]["valid"] / total - 0.05) < 0.01 and abs(facts["pairs"]["test"] / total - 0.05) < 0.01


# --- WMT raw text and sacrebleu test sets ----------------------------------------------------------


def fake_wmt(root: Path, sizes=(120, 10, 12), seed: int = 5) -> dict[str, tuple[list[str], list[str]]]:
    root.mkdir(parents=True, exist_ok=True)
    pairs = list(random_pairs(sum(sizes), seed).items())
    splits, start = {}, 0
    for split, size in zip(SPLITS, sizes):
        chunk = pairs[start:start + size]
        start += size
        splits[split] = ([s for s, _ in chunk], [t for _, t in chunk])
        (root / f"{split}.en").write_text("".join(f"{s}\n" for s, _ in chunk), encoding="utf-8")
        (root / f"{split}.de").write_text("".join(f"{t}\r\n" for _, t in chunk), encoding="utf-8")  # CRLF too
    return splits


def test_wmt_tree_is_read_line_by_line(tmp_path):
    splits = fake_wmt(tmp_path)
    (tmp_path / "valid.en").write_text("".join(f"{s}\n" for s in splits["valid"][0]).rstrip("\n"))  # no last \n
    corpus = wmt_corpus(tmp_path)
    for split in SPLITS:
        assert (corpus.sources[split], corpus.targets[split]) == splits[split]
    assert corpus.pairs == {"train": 120, "valid": 10, "test": 12} and corpus.name == "wmt"
    every = "".join(f"{s}\t{t}\n" for split in SPLITS for s, t in zip(*splits[split]))
    assert corpus.sha256 == hashlib.sha256(every.encode()).hexdigest()
    backwards = wmt_corpus(tmp_path, "de", "en")
    assert backwards.sources["test"] == splits["test"][1] and backwards.targets["test"] == splits["test"][0]
    (tmp_path / "train.de").write_text("eins\u2028zwei\nzwei\n" * 60)  # a Unicode line separator inside a line
    assert wmt_corpus(tmp_path).targets["train"][0] == "eins\u2028zwei"


def test_bad_wmt_trees_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing train\.en, train\.de.*no such dir.*prepare-wmt14en2de"):
        wmt_corpus(tmp_path / "nope")
    fake_wmt(tmp_path)
    (tmp_path / "test.de").unlink()
    with pytest.raises(ConfigError, match=r"incomplete.*missing test\.de \(found \['test\.en'"):
        wmt_corpus(tmp_path)
    fake_wmt(tmp_path)
    (tmp_path / "valid.de").write_text("nur eine Zeile\n")
    with pytest.raises(ConfigError, match=r"valid\.en has 10 lines but .*valid\.de has 1"):
        wmt_corpus(tmp_path)
    fake_wmt(tmp_path)
    (tmp_path / "test.en").write_text("")
    (tmp_path / "test.de").write_text("")
    with pytest.raises(ConfigError, match=r"test\.en is empty"):
        wmt_corpus(tmp_path)
    fake_wmt(tmp_path)
    (tmp_path / "train.de").write_bytes("Größe\n".encode("latin-1") * 120)
    with pytest.raises(ConfigError, match=r"train\.de is not UTF-8"):
        wmt_corpus(tmp_path)


def fake_sacrebleu(root: Path, name: str, sources: list[str], references: list[str], pair: str = "en-de") -> None:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    columns = {"src": sources, "ref": references, "docid": ["doc1"] * len(sources), "genre": ["news"] * len(sources),
               "origlang": ["en"] * len(sources)}
    for field, lines in columns.items():
        (directory / f"{name}.{pair}.{field}").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def test_named_test_set_is_read_offline_from_sacrebleu_dir(tmp_path, monkeypatch):
    fake_wmt(tmp_path / "wmt")
    sacrebleu = tmp_path / "sb"
    monkeypatch.setenv("SACREBLEU", str(sacrebleu))
    named = list(random_pairs(7, seed=11).items())
    fake_sacrebleu(sacrebleu, "wmt14", [f"  {s} " for s, _ in named], [t for _, t in named])
    dm = WmtDataModule(root=str(tmp_path / "wmt"), test_set="wmt14", vocab_size=VOCAB, batch_size=4)
    assert dm.sources("test") == [s for s, _ in named] and dm.references("test") == [t for _, t in named]
    batches = list(dm.test_dataloader())
    order = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(order) == list(range(7))  # every pair once, shortest first
    longer_side = [max(len(dm.encode_source(s)), len(dm.tokenizer.encode(t)) + 1) for s, t in named]
    assert [longer_side[i] for i in order] == sorted(longer_side)
    first = batches[0]
    source = dm.encode_source(named[order[0]][0])
    assert first["src"][0, :len(source)].tolist() == source
    assert dm.describe()["test_set"] == "wmt14" and dm.describe()["test_pairs"] == 7
    assert dm.describe()["test_set_dir"] == str(sacrebleu / "wmt14")
    assert dm.bleu_indices("test") == list(range(7)) and len(dm.sources("valid")) == 10  # valid stays the tree's

    (sacrebleu / "wmt14" / "wmt14.en-de.genre").unlink()
    with pytest.raises(ConfigError) as error:
        WmtDataModule(root=str(tmp_path / "wmt"), test_set="wmt14", vocab_size=VOCAB, batch_size=4)
    message = str(error.value)
    assert all(f"wmt14.en-de.{f}" in message for f in ("src", "ref", "docid", "genre", "origlang"))
    assert f"in {sacrebleu / 'wmt14'} (SACREBLEU={sacrebleu})" in message and "missing wmt14.en-de.genre." in message
    assert "sacrebleu -t wmt14 -l en-de --echo src" in message
    with pytest.raises(ConfigError, match=r"missing wmt17\.de-en\.src, wmt17\.de-en\.ref"):
        WmtDataModule(root=str(tmp_path / "wmt"), src_lang="de", tgt_lang="en", test_set="wmt17", vocab_size=VOCAB)
    fake_sacrebleu(sacrebleu, "wmt17", ["a b c", "d e f"], ["x y z"])
    with pytest.raises(ConfigError, match=r"has 2 lines and .*wmt17\.en-de\.ref 1"):
        WmtDataModule(root=str(tmp_path / "wmt"), test_set="wmt17", vocab_size=VOCAB)


# --- the synthetic task ----------------------------------------------------------------------------


def test_synthetic_task_is_deterministic_and_is_a_word_mapping_with_adjacent_swaps():
    corpus = synthetic_corpus(train_pairs=300, valid_pairs=20, test_pairs=20, words=10, min_words=2, max_words=7)
    again = synthetic_corpus(train_pairs=300, valid_pairs=20, test_pairs=20, words=10, min_words=2, max_words=7)
    assert corpus.sources == again.sources and corpus.targets == again.targets and corpus.sha256 == again.sha256
    other = synthetic_corpus(train_pairs=300, valid_pairs=20, test_pairs=20, words=10, min_words=2, max_words=7,
                             data_seed=1)
    assert other.sources["train"] != corpus.sources["train"]
    source_words, target_words = synthetic_vocabularies(10)
    assert len(set(source_words) | set(target_words)) == 20 and all(w.islower() for w in source_words)
    mapping: dict[str, set[str]] = {}
    lengths = Counter()
    for split in SPLITS:
        for source, target in zip(corpus.sources[split], corpus.targets[split]):
            words, translated = source.split(), target.split()
            lengths[len(words)] += 1
            assert len(words) == len(translated) and set(words) <= set(source_words)
            unswapped = list(translated)
            for i in range(0, len(unswapped) - 1, 2):
                unswapped[i], unswapped[i + 1] = unswapped[i + 1], unswapped[i]
            for word, image in zip(words, unswapped):
                mapping.setdefault(word, set()).add(image)
    assert all(len(images) == 1 for images in mapping.values())  # a function ...
    assert len({next(iter(images)) for images in mapping.values()}) == len(mapping) == 10  # ... one to one
    assert sorted(lengths) == [2, 3, 4, 5, 6, 7]


# --- the DataModule: batches, round trip, resume ----------------------------------------------------


def test_batches_hold_eos_bos_pad_and_index_of_independently_encoded_pairs(locale_dir):
    dm = GettextDataModule(locale_dir=str(locale_dir), min_pairs=1, vocab_size=VOCAB, batch_size=8,
                           bleu_sentences=5)
    corpus = gettext_corpus(locale_dir, min_pairs=1)
    encode = lambda text: dm.tokenizer.encode(text).tolist()  # noqa: E731  (one sentence at a time)
    assert dm.model_kwargs["vocab_size"] == VOCAB and dm.model_kwargs["pad_id"] == 0
    assert dm.task_kwargs == {"pad_id": 0, "bos_id": 2, "eos_id": 3}
    longest = max(len(encode(s)) + 1 for split in SPLITS for s in corpus.sources[split] + corpus.targets[split])
    assert dm.model_kwargs["max_positions"] == 2 * longest + 16

    def check(batch, sources, targets):
        b = len(batch["index"])
        assert batch["src"].dtype == batch["tgt_in"].dtype == batch["index"].dtype == torch.long
        assert batch["tgt_in"].shape == batch["tgt_out"].shape and batch["src"].shape[0] == b
        for row, index in enumerate(batch["index"].tolist()):
            src, tgt = encode(sources[index]), encode(targets[index])
            assert batch["src"][row].tolist() == src + [3] + [0] * (batch["src"].shape[1] - len(src) - 1)
            assert batch["tgt_in"][row].tolist() == [2] + tgt + [0] * (batch["tgt_in"].shape[1] - len(tgt) - 1)
            assert batch["tgt_out"][row].tolist() == tgt + [3] + [0] * (batch["tgt_out"].shape[1] - len(tgt) - 1)
        assert max(len(encode(sources[i])) + 1 for i in batch["index"].tolist()) == batch["src"].shape[1]

    val = list(dm.val_dataloader())
    val_order = torch.cat([b["index"] for b in val]).tolist()
    assert sorted(val_order) == list(range(corpus.pairs["valid"]))  # every pair once, shortest first
    longer = [max(len(encode(s)), len(encode(t))) for s, t in zip(corpus.sources["valid"], corpus.targets["valid"])]
    assert [longer[i] for i in val_order] == sorted(longer)
    for batch in val:
        check(batch, dm.sources("valid"), dm.references("valid"))
    assert dm.sources("valid") == corpus.sources["valid"] and dm.references("test") == corpus.targets["test"]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == corpus.pairs["train"] // 8 and all(len(b["index"]) == 8 for b in batches)
    order = [i for i, _ in loader.sampler.epoch_keys()]
    assert torch.cat([b["index"] for b in batches]).tolist() == order[:len(batches) * 8]
    for batch in batches[:5]:
        check(batch, corpus.sources["train"], corpus.targets["train"])
    assert len(dm.test_dataloader().dataset) == corpus.pairs["test"]
    probe = dm.probe_batch(4)
    chosen = np.unique(np.linspace(0, corpus.pairs["valid"] - 1, 4).round().astype(int)).tolist()
    assert set(probe) == {"src", "tgt_in"} and probe["src"].shape[0] == 4
    assert probe["src"][:, 0].tolist() == [encode(corpus.sources["valid"][i])[0] for i in chosen]
    assert dm.bleu_indices("valid") == np.unique(np.linspace(0, corpus.pairs["valid"] - 1, 5).round()).astype(
        int).tolist()
    facts = dm.describe()
    assert facts["pairs"] == corpus.pairs and facts["tokenizer"] == "sentencepiece" and facts["bleu_sentences"] == 5
    assert facts["tokens"]["valid"]["target"] == sum(len(encode(t)) for t in corpus.targets["valid"])
    assert facts["corpus"] == "gettext_de" and "pkg0.mo" in facts["pairs_per_catalog"]


def test_decode_inverts_encode_and_ignores_special_ids(locale_dir):
    dm = GettextDataModule(locale_dir=str(locale_dir), min_pairs=1, vocab_size=VOCAB, batch_size=8)
    for text in dm.references("valid") + dm.sources("test") + ["ünseen wörds ☃ and 12345"]:
        ids = dm.encode_source(text)
        assert ids[-1] == 3 and 1 not in ids  # byte fallback: never <unk>
        assert dm.decode(ids[:-1]) == text and dm.decode(torch.tensor([2, *ids, 0, 0])) == text
    assert dm.encode_source("  the file is empty \n") == dm.encode_source("the file is empty")
    batch = next(iter(dm.val_dataloader()))
    row = batch["tgt_out"][0]
    assert dm.decode(row[row != 0][:-1]) == dm.references("valid")[batch["index"][0]]


def test_train_loader_resumes_mid_epoch_exactly(locale_dir):
    make = lambda seed: GettextDataModule(locale_dir=str(locale_dir), min_pairs=1, vocab_size=VOCAB,  # noqa: E731
                                          batch_size=8, seed=seed)

    def epoch(dm, e):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(e)
        return [b["index"] for b in loader]

    dm = make(0)
    uninterrupted = epoch(dm, 2)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, epoch(make(0), 2)))
    assert not torch.equal(torch.cat(uninterrupted), torch.cat(epoch(make(1), 2)))
    assert not torch.equal(torch.cat(uninterrupted), torch.cat(epoch(dm, 3)))
    assert_loader_resumes_mid_epoch(lambda: make(0).train_dataloader(), epoch=2, after=7, key=lambda b: b["index"])


def test_max_len_drops_long_training_pairs_only(tmp_path):
    fake_wmt(tmp_path)
    full = WmtDataModule(root=str(tmp_path), vocab_size=VOCAB, batch_size=4)
    corpus = wmt_corpus(tmp_path)
    lengths = {split: [max(len(full.tokenizer.encode(s)), len(full.tokenizer.encode(t))) + 1
                       for s, t in zip(corpus.sources[split], corpus.targets[split])] for split in SPLITS}
    max_len = int(np.median(lengths["train"]))
    dm = WmtDataModule(root=str(tmp_path), vocab_size=VOCAB, batch_size=4, max_len=max_len)
    fits = [i for i, n in enumerate(lengths["train"]) if n <= max_len]
    assert dm.train_set.indices.tolist() == fits and 0 < len(fits) < 120
    assert dm.describe()["train_pairs_too_long"] == 120 - len(fits)
    assert all(b["src"].shape[1] <= max_len and b["tgt_in"].shape[1] <= max_len for b in dm.train_dataloader())
    assert len(dm.val_set) == 10 and len(dm.test_set) == 12  # kept whole, however long
    assert dm.model_kwargs["max_positions"] == 2 * max(lengths["valid"] + lengths["test"] + [
        n for n in lengths["train"] if n <= max_len]) + 16


# --- configs, the command, bad input ------------------------------------------------------------------


def test_data_configs_instantiate_with_their_documented_defaults(tmp_path, locale_dir):
    synthetic = instantiate(OmegaConf.load(CONF_DATA / "synthetic_translation.yaml"), seed=0)
    facts = synthetic.describe()
    assert facts["pairs"] == {"train": 2000, "valid": 200, "test": 200} and facts["vocab_size"] == 400
    assert synthetic.batch_size == 64 and len(synthetic.train_dataloader()) == facts["train_pairs_used"] // 64
    gettext_de = OmegaConf.load(CONF_DATA / "gettext_de.yaml")
    assert (gettext_de.locale_dir, gettext_de.vocab_size, gettext_de.batch_size) == ("/usr/share/locale", 6000, 64)
    gettext_de.locale_dir, gettext_de.min_pairs, gettext_de.vocab_size = str(locale_dir), 1, VOCAB
    assert instantiate(gettext_de, seed=0).describe()["corpus"] == "gettext_de"
    fake_wmt(tmp_path / "wmt")
    wmt = OmegaConf.load(CONF_DATA / "wmt.yaml")
    wmt.root, wmt.vocab_size = str(tmp_path / "wmt"), VOCAB
    assert instantiate(wmt, seed=0).describe()["languages"] == "en-de"


def test_data_translation_command_prepares_and_prints_the_corpus(locale_dir, data_cache, capsys):
    assert cli.main(["data", "translation", "--root", str(locale_dir), "--vocab-size", str(VOCAB),
                     "--min-pairs", "10"]) == 0
    out = capsys.readouterr().out
    corpus = gettext_corpus(locale_dir, min_pairs=1)
    for split in SPLITS:
        assert f"{corpus.pairs[split]:,}" in out
    filters = corpus.facts["filters"]
    assert f"duplicate {filters['duplicate']:,}" in out and "pkg0.mo 250" in out and "3 read" in out
    assert corpus.sha256 in out and "vocabulary 340" in out and str(data_cache) in out
    assert "licence    each catalog's package's own" in out
    assert (data_cache / "sentencepiece" / f"{corpus.corpus_id}-bpe{VOCAB}.model").is_file()
    assert cli.main(["data", "translation", "--root", str(locale_dir), "--vocab-size", str(VOCAB)]) == 2
    assert "data.min_pairs=5000" in capsys.readouterr().err
    assert cli.main(["data", "translation", "--corpus", "wmt"]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert cli.main(["data", "translation", "--corpus", "synthetic_translation", "--root", "x"]) == 2
    assert "leave out --root" in capsys.readouterr().err
    assert cli.main(["data", "translation", "--corpus", "synthetic_translation"]) == 0
    assert "synthetic_translation" in capsys.readouterr().out


def test_bad_options_are_config_errors(tmp_path, locale_dir):
    good = dict(locale_dir=str(locale_dir), min_pairs=1, vocab_size=VOCAB, batch_size=8)
    for options, match in (({"vocab_size": 100}, r"data.vocab_size must be a whole number >= 262"),
                           ({"vocab_size": 340.0}, "data.vocab_size must be a whole number"),
                           ({"vocab_size": True}, "data.vocab_size must be a whole number"),
                           ({"batch_size": 0}, "data.batch_size must be a whole number >= 1"),
                           ({"num_workers": -1}, "data.num_workers"),
                           ({"seed": -1}, "data.seed"),
                           ({"max_len": 1}, "data.max_len must be a whole number >= 2"),
                           ({"bleu_sentences": 0}, r"data.bleu_sentences must be a whole number >= 1 \(or null"),
                           ({"test_set": 14}, "data.test_set must be null .* or the name of a sacrebleu test set"),
                           ({"test_set": "../wmt14"}, "data.test_set must be null"),
                           ({"language": "../de"}, "data.language must be a locale name"),
                           ({"min_pairs": 0}, "data.min_pairs must be a whole number >= 1"),
                           ({"batch_size": 5000}, r"batch_size=5000 is more than the .* training pairs"),
                           ({"max_len": 3}, r"fit data.max_len=3 tokens"),
                           ({"vocab_size": 5000}, r"Vocabulary size too high .*data.vocab_size")):
        with pytest.raises(ConfigError, match=match):
            GettextDataModule(**{**good, **options})
    dm = GettextDataModule(**good)
    with pytest.raises(ConfigError, match=r"probe batch size must be between 1 and the \d+ validation pairs"):
        dm.probe_batch(len(dm.val_set) + 1)
    with pytest.raises(ConfigError, match="split must be 'valid' or 'test'"):
        dm.references("train")
    fake_wmt(tmp_path / "wmt")
    for options, match in (({"src_lang": "e n"}, "data.src_lang must be a language code"),
                           ({"tgt_lang": "en"}, "are both 'en'")):
        with pytest.raises(ConfigError, match=match):
            WmtDataModule(root=str(tmp_path / "wmt"), **options)
    for options, match in (({"words": 1}, "data.words must be a whole number >= 2"),
                           ({"train_pairs": 0}, "data.train_pairs must be"),
                           ({"min_words": 5, "max_words": 4}, "data.min_words <= data.max_words"),
                           ({"data_seed": 1.5}, "data.data_seed must be")):
        with pytest.raises(ConfigError, match=match):
            SyntheticTranslationDataModule(**options)


def test_length_grouped_sampler_sorts_groups_shuffles_batches_and_resumes_exactly():
    from sigma_repro.data.parallel import LengthGroupedSampler

    lengths = np.random.default_rng(0).integers(1, 60, size=203)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=4)
    sampler.set_epoch(2)
    keys = [i for i, _ in sampler.epoch_keys()]
    assert sorted(keys) == list(range(203))  # every item once
    batches = [keys[i:i + 8] for i in range(0, 200, 8)]  # 25 full batches; the 3 left over come last
    assert set(keys[200:]) == set(range(203)) - {i for b in batches for i in b}
    for batch in batches:  # each batch is a run of one sorted group
        assert [lengths[i] for i in batch] == sorted(lengths[i] for i in batch)
    waste = sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in map(np.array, batches))
    random_waste = sum(max(lengths[b]) * 8 - lengths[b].sum() for b in np.arange(200).reshape(25, 8))
    assert waste < random_waste / 3  # far less padding than batches in index order
    assert keys == [i for i, _ in sampler.epoch_keys()]  # a function of (seed, epoch) alone
    sampler.set_epoch(3)
    assert keys != [i for i, _ in sampler.epoch_keys()]
    sampler.set_epoch(2)
    sampler.start = 16  # a resumed epoch skips its first two batches exactly
    assert [i for i, _ in sampler] == keys[16:]
    prefix = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=4, per_epoch=64)
    assert len(prefix) == 64 and len(prefix.epoch_keys()) == 64
