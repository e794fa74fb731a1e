"""`sigma-repro bench reparam --task asr` on one-layer speech models: the record's structure and arithmetic
(step ratios, frames/s, feature-extraction hours per minute with the data's own feature functions), the model it times (the conf/model config,
σReparam on exactly one of the two), the batches (lengths bucketed within 10%, zero padding, labels a
CTC path fits), the CTC loss against a hand computation, and bad options."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sigma_repro import bench
from sigma_repro.data import speech as speech_data
from sigma_repro.data.speech import utterance_cmvn
from sigma_repro.errors import ConfigError
from sigma_repro.models.speech import ConformerCTC, SpeechTransformer
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam

from .test_bench import assert_timed_pairs, parse, restore_threads  # noqa: F401 - restore_threads is a fixture


@pytest.mark.parametrize("model,cls,matrices", [
    ("conformer_tiny", ConformerCTC, 4 + 9),  # front end 2 Conv2d + Linear, head; per layer 4 FFN, in/out, 3 Conv1d
    ("speech_transformer_tiny", SpeechTransformer, 2 + 6),  # Conv1d front end, head; per layer q/k/v/out, 2 FFN
])
def test_asr_bench_writes_step_ratios_frames_per_second_and_feature_throughput(
        model, cls, matrices, tmp_path, capsys, monkeypatch, restore_threads):
    applied, batches = [], []

    def recording_apply(m, **options):
        applied.append((m, options))
        return apply_sigma_reparam(m, **options)

    real_subject = bench.REPARAM_SUBJECTS["asr"]

    def recording_subject(args, device):
        subject = real_subject(args, device)
        return subject._replace(batch=lambda n: batches.append(subject.batch(n)) or batches[-1])

    extracted = []  # (frames, 80) features of each timed utterance, made by the data's own functions

    def recording_cmvn(features):
        extracted.append(features.shape)
        return utterance_cmvn(features)

    monkeypatch.setattr(bench, "apply_sigma_reparam", recording_apply)
    monkeypatch.setitem(bench.REPARAM_SUBJECTS, "asr", recording_subject)
    monkeypatch.setattr(speech_data, "utterance_cmvn", recording_cmvn)
    out = tmp_path / "bench" / "reparam_asr.json"
    args = parse("reparam", "--task", "asr", "--model", model, "--depth", "1", "--seq-len", "40", "--batch-sizes",
                 "2,3", "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out))
    assert bench.run(args) == 0
    record = json.loads(out.read_text())

    config = record["config"]
    assert (config["task"], config["model"], config["depth"], config["seq_len"], config["vocab_size"]) == (
        "asr", model, 1, 40, 29)
    (timed, options), = applied
    assert isinstance(timed, cls) and options == {"qkv": "fused", "power_iters": 1}
    assert (timed.input_dim, timed.vocab_size) == (80, 29)
    assert len(list(iter_sigma_reparam(timed))) == matrices
    assert_timed_pairs(record, batch_sizes=[2, 3], repeats=2)
    for result in record["results"]:
        for name in ("plain", "reparam"):
            assert result["frames_per_s"][name] == result["batch_size"] * 40 / result[name]["wall_s"]
    assert len(record["machine"]["load_average"]) == 3

    for (features, lengths), (labels, label_lengths) in batches:
        n = len(lengths)
        assert features.shape == (n, 40, 80) and lengths[0] == 40 and lengths.min() >= 36
        assert all(features[i, L:].abs().sum() == 0 and features[i, L - 1].abs().sum() > 0
                   for i, L in enumerate(lengths.tolist()))
        assert torch.equal(label_lengths, lengths * 15 // 100) and labels.min() >= 1 and labels.max() <= 28
        assert (timed.output_lengths(lengths) >= label_lengths).all()  # a CTC path exists: no zero_infinity needed

    f = record["features"]
    assert (f["utterances"], f["seconds_per_utterance"], len(f["samples"])) == (3, 0.4, 2)
    assert f["audio_hours_per_minute"] == pytest.approx(3 * 0.4 / 3600 / (f["wall_s"] / 60))
    assert f["realtime_factor"] == pytest.approx(f["audio_hours_per_minute"] * 60)
    assert extracted == [(41, 80)] * 3 * (1 + 2)  # 0.4 s at 16 kHz: 1 + 6400 // 160 frames; untimed pass + 2 timed
    printed = capsys.readouterr().out
    assert "plain frames/s" in printed and "hours of audio per minute" in printed and f"wrote {out}" in printed


def test_ctc_loss_is_per_target_character_against_a_hand_computation():
    # One frame per label, uniform logits: the only path emits each label once, probability (1/V)^S.
    V, S = 5, 3
    logits = torch.zeros(2, S, V)
    labels = torch.tensor([[1, 2, 3], [4, 4, 0]])
    # row 0: 3 labels in 3 frames, one path, -log p = 3 log V; row 1: "4 4" needs a blank between, 3 frames, but
    # has 2 -> inf, zeroed (zero_infinity); per character: (3 log V + 0) / (3 + 2)
    loss = bench._ctc_loss((logits, torch.tensor([3, 2])), (labels, torch.tensor([3, 2])))
    assert loss.item() == pytest.approx(3 * math.log(V) / 5, rel=1e-6)
    # against torch's mean reduction when every row is feasible (mean divides each row by its own length)
    lengths = torch.tensor([6, 6])
    logits = torch.randn(2, 6, V)
    ours = bench._ctc_loss((logits, lengths), (labels[:, :2], torch.tensor([2, 2])))
    ref = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), labels[:, :2], lengths, torch.tensor([2, 2]))
    torch.testing.assert_close(ours, ref)


def test_asr_defaults_and_bad_options():
    args = parse("reparam", "--task", "asr")
    subject = bench.REPARAM_SUBJECTS["asr"](args, torch.device("cpu"))
    assert (args.model, args.seq_len, args.vocab_size, args.batch_sizes) == ("conformer_tiny", 400, 29, [8, 32])
    assert isinstance(subject.model, ConformerCTC) and subject.units == ("frames", 400)
    with pytest.raises(ConfigError, match="--img-size do not apply to --task asr"):
        bench.run(parse("reparam", "--task", "asr", "--img-size", "32"))
    with pytest.raises(ConfigError, match="--decode-sentences do not apply to --task asr"):
        bench.run(parse("reparam", "--task", "asr", "--decode-sentences", "4"))
    with pytest.raises(ConfigError, match="takes a speech model config.*got --model mt_tiny"):
        bench.run(parse("reparam", "--task", "asr", "--model", "mt_tiny"))
    with pytest.raises(ConfigError, match="--seq-len >= 10 frames"):
        bench.run(parse("reparam", "--task", "asr", "--seq-len", "9"))
