"""`sigma-repro bench reparam --task translation` on a tiny encoder-decoder: the record's structure and
arithmetic (training steps and decoding speed), the model it times (the conf/model config, σReparam on
exactly one of the two), the decoding settings (conf/task/translation.yaml's), and bad options."""

import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sigma_repro import bench
from sigma_repro.errors import ConfigError
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam

from .conftest import CONF_DIR
from .test_bench import assert_timed_pairs, parse, restore_threads  # noqa: F401 - restore_threads is a fixture

decoding = pytest.importorskip("sigma_repro.models.decoding", reason="the translation model is not there yet")
Seq2SeqTransformer = pytest.importorskip("sigma_repro.models.seq2seq").Seq2SeqTransformer


def test_translation_bench_writes_step_ratios_and_decoding_speed(tmp_path, capsys, monkeypatch, restore_threads):
    applied, decoded = [], []

    def recording_apply(model, **options):
        applied.append((model, options))
        return apply_sigma_reparam(model, **options)

    def recording(decode):
        def wrapper(model, src, **options):
            hypotheses = decode(model, src, **options)
            decoded.append((decode.__name__, model, src, options, hypotheses))
            return hypotheses
        return wrapper

    monkeypatch.setattr(bench, "apply_sigma_reparam", recording_apply)
    monkeypatch.setattr(decoding, "greedy_decode", recording(decoding.greedy_decode))
    monkeypatch.setattr(decoding, "beam_search", recording(decoding.beam_search))
    out = tmp_path / "bench" / "reparam_mt.json"
    args = parse("reparam", "--task", "translation", "--depth", "1", "--seq-len", "6", "--batch-sizes", "2,3",
                 "--repeats", "2", "--warmup", "1", "--decode-sentences", "3", "--decode-repeats", "2",
                 "--threads", "1", "--out", str(out))
    assert bench.run(args) == 0
    record = json.loads(out.read_text())

    config = record["config"]
    assert (config["task"], config["model"], config["depth"], config["seq_len"], config["vocab_size"]) == (
        "translation", "mt_tiny", 1, 6, 6000)
    assert (config["decode_sentences"], config["decode_repeats"], config["img_size"]) == (3, 2, None)
    (model, options), = applied
    assert isinstance(model, Seq2SeqTransformer) and options == {"qkv": "fused", "power_iters": 1}
    assert (len(model.encoder.layers), len(model.decoder.layers), model.embed.weight.shape) == (1, 1, (6000, 64))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.head]
    assert len(list(iter_sigma_reparam(model))) == len(linears) >= 2 * 2 + 2 * 4  # the tied head is not

    assert_timed_pairs(record, batch_sizes=[2, 3], repeats=2)
    for result in record["results"]:
        for name in ("plain", "reparam"):
            assert result["tokens_per_s"][name] == result["batch_size"] * 6 / result[name]["wall_s"]

    # decoding: each model, each method, one untimed + 2 timed calls on the same 3 sources
    task = OmegaConf.load(CONF_DIR / "task" / "translation.yaml")
    d = record["decoding"]
    assert (d["sentences"], d["source_tokens"], d["beam_size"], d["lenpen"], d["max_len_a"], d["max_len_b"]) == (
        3, 6, task.beam_size, task.lenpen, task.max_len_a, task.max_len_b)
    assert len(decoded) == 2 * 2 * 3
    sources = {tuple(map(tuple, src.tolist())) for *_, src, _, _ in decoded}
    assert len(sources) == 1
    src = sources.pop()
    assert len(src) == 3 and all(len(s) == 6 and s[-1] == bench.EOS_ID and min(s[:-1]) >= 4 for s in src)
    limits = {"bos_id": 2, "eos_id": 3, "max_len_a": task.max_len_a, "max_len_b": task.max_len_b}
    for name, _, _, options, hypotheses in decoded:
        extra = {"beam_size": task.beam_size, "lenpen": task.lenpen} if name == "beam_search" else {}
        assert options == {**limits, **extra}
        # eos held back until the length limit: every hypothesis is as long as it may be (the eos not counted)
        assert [len(h) for h in hypotheses] == [int(task.max_len_a * 6 + task.max_len_b)] * 3
    assert sum(m is model for _, m, *_ in decoded) == len(decoded) / 2  # half of the calls decode the σReparam model
    assert d["eos_held_back"] and not model.head._forward_hooks  # the hook is gone after timing
    for method, function in (("greedy", "greedy_decode"), ("beam", "beam_search")):
        for who in ("plain", "reparam"):
            timing = d[who][method]
            assert len(timing["samples"]) == 2 and timing["wall_s"] == statistics.median(timing["samples"])
            assert timing["sentences_per_s"] == 3 / timing["wall_s"]
            last = [h for name, m, *_, h in decoded if name == function and (m is model) == (who == "reparam")][-1]
            assert timing["mean_hypothesis_tokens"] == sum(map(len, last)) / 3
        assert d["ratio"][method] == d["reparam"][method]["wall_s"] / d["plain"][method]["wall_s"]

    table = capsys.readouterr().out
    assert "mt_tiny (1L-1L, dim 64" in table and "reparam tokens/s" in table and "decoding 3 sources of 6 tokens" in table


def test_translation_defaults_are_the_proxy_run():
    args = parse("reparam", "--task", "translation")
    subject = bench._mt_subject(args, torch.device("cpu"))
    assert (args.model, args.seq_len, args.vocab_size, args.batch_sizes) == ("mt_tiny", 32, 6000, [16, 64])
    assert (args.decode_sentences, args.decode_repeats) == (64, 3)
    (src, tgt_in), tgt_out = subject.batch(5)
    assert src.shape == tgt_in.shape == tgt_out.shape == (5, 32)
    assert (tgt_in[:, 0] == 2).all() and torch.equal(tgt_in[:, 1:], tgt_out[:, :-1]) and (tgt_out[:, -1] == 3).all()
    assert not (src == 0).any() and not (tgt_in == 0).any()  # no padding: the models take the unmasked path


def test_translation_options_are_refused_elsewhere_and_bad_ones_named():
    with pytest.raises(ConfigError, match=r"--img-size do not apply to --task translation"):
        bench.run(parse("reparam", "--task", "translation", "--img-size", "32"))
    with pytest.raises(ConfigError, match=r"--decode-sentences do not apply to --task lm"):
        bench.run(parse("reparam", "--task", "lm", "--decode-sentences", "8"))
    with pytest.raises(ConfigError, match=r"--decode-repeats do not apply to --task vit"):
        bench.run(parse("reparam", "--decode-repeats", "2"))
    with pytest.raises(ConfigError, match=r"--task translation takes an encoder-decoder config \['mt_base', 'mt_tiny'\]"):
        bench.run(parse("reparam", "--task", "translation", "--model", "gpt_tiny"))
    with pytest.raises(ConfigError, match=r"--task lm takes a GPT config"):
        bench.run(parse("reparam", "--task", "lm", "--model", "mt_tiny"))
    with pytest.raises(ConfigError, match=r"--vocab-size > 4 \(ids 0-3 are pad, unk, bos, eos\)"):
        bench.run(parse("reparam", "--task", "translation", "--vocab-size", "4"))
