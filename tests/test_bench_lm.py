"""`sigma-repro bench reparam --task lm` on a tiny GPT: the record's structure and arithmetic, the
model it times (the conf/model config, σReparam on exactly one of the two), and bad options."""

import json

import pytest
import torch

from sigma_repro import bench
from sigma_repro.errors import ConfigError
from sigma_repro.models.gpt import GPT
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam

from .test_bench import assert_timed_pairs, parse, restore_threads  # noqa: F401 - restore_threads is a fixture


def test_lm_bench_writes_tokens_per_second_and_ratios(tmp_path, capsys, monkeypatch, restore_threads):
    applied = []

    def recording_apply(model, **options):
        applied.append((model, options))
        return apply_sigma_reparam(model, **options)

    monkeypatch.setattr(bench, "apply_sigma_reparam", recording_apply)
    out = tmp_path / "bench" / "reparam_lm.json"
    args = parse("reparam", "--task", "lm", "--depth", "1", "--seq-len", "16", "--batch-sizes", "2,3",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out))
    assert bench.run(args) == 0
    record = json.loads(out.read_text())

    config = record["config"]
    assert (config["task"], config["model"], config["depth"], config["seq_len"], config["vocab_size"]) == (
        "lm", "gpt_tiny", 1, 16, 256)
    assert config["img_size"] is None and config["batch_sizes"] == [2, 3]
    (model, options), = applied
    assert isinstance(model, GPT) and options == {"qkv": "fused", "power_iters": 1}
    assert len(model.decoder.layers) == 1 and model.tok_emb.weight.shape == (256, 64)  # gpt_tiny's width
    assert len(list(iter_sigma_reparam(model))) == 6  # q, k, v, out, fc1, fc2; the tied head is not

    assert_timed_pairs(record, batch_sizes=[2, 3], repeats=2)
    for result in record["results"]:
        for name in ("plain", "reparam"):
            assert result["tokens_per_s"][name] == result["batch_size"] * 16 / result[name]["wall_s"]
    table = capsys.readouterr().out
    assert "gpt_tiny (depth 1, dim 64" in table and "reparam tokens/s" in table and f"wrote {out}" in table


def test_lm_defaults_are_a_realistic_cpu_batch_and_vit_keeps_its_own():
    lm, vit = parse("reparam", "--task", "lm"), parse("reparam")
    bench._lm_subject(lm, torch.device("cpu"))
    assert (lm.model, lm.seq_len, lm.vocab_size, lm.batch_sizes) == ("gpt_tiny", 128, 256, [8, 32])
    assert vit.task == "vit" and vit.model is None  # filled by the ViT path: vit_small, 224, 1,4,16


def test_options_of_the_other_task_are_refused():
    with pytest.raises(ConfigError, match=r"--img-size do not apply to --task lm"):
        bench.run(parse("reparam", "--task", "lm", "--img-size", "32"))
    with pytest.raises(ConfigError, match=r"--seq-len, --vocab-size do not apply to --task vit"):
        bench.run(parse("reparam", "--seq-len", "16", "--vocab-size", "8"))
    with pytest.raises(ConfigError, match=r"--task lm takes a GPT config \['gpt_small', 'gpt_tiny', 'gpt_wt103'\]"):
        bench.run(parse("reparam", "--task", "lm", "--model", "vit_tiny"))
    with pytest.raises(ConfigError, match="--task vit takes a ViT size"):
        bench.run(parse("reparam", "--model", "gpt_tiny"))
    with pytest.raises(ConfigError, match="--seq-len and --vocab-size must be >= 1"):
        bench.run(parse("reparam", "--task", "lm", "--seq-len", "0"))
