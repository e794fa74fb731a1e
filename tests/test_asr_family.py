"""The speech-recognition family, as FAMILIES.md asks of every family.

Pieces against hand computations: the CTC loss against a brute-force sum over every alignment, greedy
CTC decoding of a hand-made logit matrix, WER and CER by torchmetrics against hand-counted edits, the
task's options refused before compute, the W&B example table. The task in a Lightning run on test
doubles (a DataModule and a model that obey the data and model contracts). Then ``task=asr`` through
the app on the tiny espeak corpus (tests/speech_fixtures.py): the summary's val/loss, val/wer, val/cer
are the final weights', recomputed from the checkpoint one utterance at a time; ``transcripts.val.tsv``
and ``transcripts.test.tsv`` rescore to the logged rates; the diagnostics' entropy equals a direct
softmax of the final model's attention on the probe batch; reparam none / sigma / sigma_stats run; a
hard kill resumes exactly; a blow-up ends as ``diverged``; a re-run returns the stored result; W&B
offline tags name the family.
"""

import csv
import itertools
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader

from sigma_repro.data.base import StabilityDataModule
from sigma_repro.data.speech import collate_utterances
from sigma_repro.diagnostics.callbacks import load_diagnostics
from sigma_repro.errors import ConfigError
from sigma_repro.tasks.asr import (TSV_HEADER, ASRTask, ctc_loss_per_char, error_rates, greedy_ctc_decode,
                                   log_example_table)

from .conftest import CONF_DIR
from .helpers import computed_metrics, direct_entropy, final_model_and_data
from .speech_fixtures import TINY_ESPEAK_OVERRIDES, tiny_espeak_cache
from .test_speech_model import direct_probs
from .test_train import only_run_dir, reference_and_killed_run, train, wandb_offline_record

ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the contract's: id 0 is the blank, id i is ALPHABET[i - 1]


def text_of(ids: list[int]) -> str:
    return "".join(ALPHABET[i - 1] for i in ids)


def encode(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in text]


# -- CTC loss ----------------------------------------------------------------------------------------

def brute_force_ctc_nll(log_probs: torch.Tensor, target: list[int], blank: int = 0) -> float:
    """-log of the summed probability of every frame path (T frames, each any label) whose collapse
    (repeats merged, then blanks dropped) is ``target``."""
    T, V = log_probs.shape
    total = 0.0
    for path in itertools.product(range(V), repeat=T):
        collapsed = [label for label, _ in itertools.groupby(path) if label != blank]
        if collapsed == target:
            total += math.exp(sum(log_probs[t, s].item() for t, s in enumerate(path)))
    return -math.log(total) if total > 0 else math.inf


def test_ctc_loss_is_the_brute_force_alignment_sum_per_reference_character():
    torch.manual_seed(0)
    V = 4  # blank + 3 labels
    logits = torch.randn(3, 5, V, dtype=torch.float64)  # (B, T', V); utterance 1 uses 3 frames, 2 uses 4, 3 uses 2
    out_lengths = torch.tensor([3, 4, 2])
    targets = torch.tensor([[1, 2], [2, 2], [3, 0]])  # a repeated label needs a blank between its two frames
    target_lengths = torch.tensor([2, 2, 1])
    loss, chars = ctc_loss_per_char(logits, out_lengths, targets, target_lengths, blank_id=0)
    log_probs = logits.log_softmax(-1)
    nll = [brute_force_ctc_nll(log_probs[b, : out_lengths[b]], targets[b, : target_lengths[b]].tolist())
           for b in range(3)]
    assert chars == 5
    assert loss.item() == pytest.approx(sum(nll) / 5, rel=1e-5)
    # 3 frames for "1 2": 5 paths (1 1 2, 1 2 2, 0 1 2, 1 0 2, 1 2 0); for "2 2" in 4 frames only blank-separated ones
    assert nll[0] == pytest.approx(-math.log(sum(math.exp(sum(log_probs[0, t, s] for t, s in enumerate(p))) for p in
                                                [(1, 1, 2), (1, 2, 2), (0, 1, 2), (1, 0, 2), (1, 2, 0)])), rel=1e-9)


def test_ctc_loss_counts_an_impossible_alignment_as_zero_and_ignores_padding_frames():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, dtype=torch.float64)
    # utterance 0: "1 1" needs 3 frames, it has 2 (infinite NLL, zeroed); utterance 1: padding past frame 2
    targets, target_lengths = torch.tensor([[1, 1], [2, 0]]), torch.tensor([2, 1])
    loss, chars = ctc_loss_per_char(logits, torch.tensor([2, 2]), targets, target_lengths, blank_id=0)
    changed = logits.clone()
    changed[1, 2:] = 100.0  # what the padding frames hold changes nothing
    same, _ = ctc_loss_per_char(changed, torch.tensor([2, 2]), targets, target_lengths, blank_id=0)
    nll = brute_force_ctc_nll(logits[1, :2].log_softmax(-1), [2])
    assert chars == 3 and loss.item() == pytest.approx(nll / 3, rel=1e-6) and same.item() == loss.item()


def test_ctc_loss_is_computed_in_fp32_from_half_precision_logits():
    logits = torch.randn(1, 6, 5).to(torch.bfloat16)
    loss, _ = ctc_loss_per_char(logits, torch.tensor([6]), torch.tensor([[1, 2]]), torch.tensor([2]), blank_id=0)
    ref, _ = ctc_loss_per_char(logits.float(), torch.tensor([6]), torch.tensor([[1, 2]]), torch.tensor([2]), blank_id=0)
    assert loss.dtype == torch.float32 and loss.item() == ref.item()


# -- greedy decoding -------------------------------------------------------------------------------

def one_hot_logits(paths: list[list[int]], V: int = 29) -> torch.Tensor:
    """Logits (B, T, V) whose argmax at frame t of utterance b is paths[b][t] (other entries noise below it)."""
    T = max(len(p) for p in paths)
    logits = torch.rand(len(paths), T, V)
    for b, path in enumerate(paths):
        for t, label in enumerate(path):
            logits[b, t, label] = 2.0
    return logits


def test_greedy_decoding_merges_repeats_then_drops_blanks_within_each_length():
    H, E, L_, O = encode("HELO")
    paths = [[H, H, 0, E, L_, L_, 0, L_, O, O, 0, 3, 3],  # "HELLO": a blank keeps the double L apart
             [0, 1, 1, 0, 2, 2, 2, 0, 0, 1, 1, 1, 1]]   # " ' " and then padding frames that would add " "
    logits = one_hot_logits(paths)
    decoded = greedy_ctc_decode(logits, torch.tensor([11, 9]), blank_id=0)
    assert decoded == [[H, E, L_, L_, O], [1, 2]]
    assert [text_of(ids) for ids in decoded] == ["HELLO", " '"]
    assert greedy_ctc_decode(logits, torch.tensor([13, 13]), blank_id=0)[1] == [1, 2, 1]
    assert greedy_ctc_decode(logits[:1], torch.tensor([0]), blank_id=0) == [[]]  # no frames: empty transcript


# -- WER and CER ------------------------------------------------------------------------------------

def test_wer_and_cer_by_torchmetrics_match_hand_counted_edits():
    assert error_rates(["THE CAT SAT DOWN"], ["THE CAT SAT"]) == pytest.approx({"wer": 1 / 3, "cer": 5 / 11})
    # corpus level: edits summed over utterances, over all reference words (characters): not a mean of rates
    rates = error_rates(["THE CAT SAT DOWN", "A DOG"], ["THE CAT SAT", "A DOG RAN"])
    assert rates == pytest.approx({"wer": (1 + 1) / (3 + 3), "cer": (5 + 4) / (11 + 9)})
    assert error_rates(["", "THE BAT"], ["THE CAT", "THE CAT"]) == pytest.approx({"wer": 3 / 4, "cer": 8 / 14})
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        error_rates(["A"], ["A", "B"])


# -- options ------------------------------------------------------------------------------------------

OPTIM = {"_target_": "torch.optim.Adam", "lr": 1e-3}


@pytest.mark.parametrize("option, value, message", [
    ("decoding", "beam", r"task.decoding must be one of \['greedy'\], found 'beam'"),
    ("blank_id", 29, r"task.blank_id must be a label id in \[0, 28\] \(a vocabulary of the blank and 28 characters\)"),
    ("blank_id", -1, r"task.blank_id must be a label id in \[0, 28\]"),
    ("blank_id", 0.0, r"task.blank_id must be a label id"),
    ("alphabet", "ABCA", r"alphabet must be a non-empty string of distinct characters"),
    ("alphabet", "", r"alphabet must be a non-empty string"),
    ("log_examples", -1, r"task.log_examples must be a whole number >= 0, found -1"),
])
def test_bad_task_options_are_named_before_any_compute(option, value, message):
    options = {"blank_id": 0, "alphabet": ALPHABET, "optim": OPTIM, "schedule": {"warmup_steps": 0}, option: value}
    with pytest.raises(ConfigError, match=message):
        ASRTask(nn.Linear(2, 2), **options)


def test_validation_examples_go_to_every_wandb_logger_as_a_table():
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    class RecordingWandb(WandbLogger):
        def __init__(self):  # no W&B run: only the call is recorded
            self.calls = []

        def log_text(self, **kwargs):
            self.calls.append(kwargs)

    wandb = RecordingWandb()
    rows = [["1-2-3", "THE CAT", "THE BAT"]]
    log_example_table([CSVLogger("unused"), wandb], "val/examples", rows, step=7)
    assert wandb.calls == [{"key": "val/examples", "columns": ["utterance_id", "reference", "hypothesis"],
                            "data": rows, "step": 7}]


# -- the task in a Lightning run, on test doubles of the data and the model -------------------------------

WORDS = ["THE", "CAT", "SAT", "ON", "A", "MAT", "DOG", "RAN", "IT'S", "HOT"]


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """The contract's batch dict: features (B, T, F) zero-padded, targets padded with 0, lengths, index."""
    B, T, S = len(items), max(len(i["features"]) for i in items), max(len(i["targets"]) for i in items)
    features, targets = torch.zeros(B, T, items[0]["features"].shape[1]), torch.zeros(B, S, dtype=torch.long)
    for b, item in enumerate(items):
        features[b, : len(item["features"])] = item["features"]
        targets[b, : len(item["targets"])] = torch.tensor(item["targets"])
    return {"features": features, "feature_lengths": torch.tensor([len(i["features"]) for i in items]),
            "targets": targets, "target_lengths": torch.tensor([len(i["targets"]) for i in items]),
            "index": torch.tensor([i["index"] for i in items])}


class FakeSpeechData(StabilityDataModule):
    """Utterances of 1-3 words; each character is 3 frames of its own random 8-dim pattern plus noise, so a
    per-frame linear model can learn to read them. Speakers: ids "<spk>-1-<utt>" with 2 speakers per split."""

    def __init__(self, sizes=(64, 12, 10), batch_size=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        patterns = torch.randn(len(ALPHABET) + 1, 8, generator=g)
        self.batch_size, self.splits = batch_size, {}
        for s, (split, n) in enumerate(zip(("train", "valid", "test"), sizes)):
            items = []
            for i in range(n):
                text = " ".join(WORDS[j] for j in torch.randint(len(WORDS), (1 + i % 3,), generator=g).tolist())
                ids = encode(text)
                frames = patterns[[0] + [c for c in ids for _ in range(3)] + [0]]
                frames = frames + 0.1 * torch.randn(frames.shape, generator=g)
                items.append({"features": frames, "targets": ids, "index": i, "text": text,
                              "id": f"{10 * s + i % 2}-1-{i}"})
            self.splits[split] = items

    model_kwargs = property(lambda self: {"input_dim": 8, "vocab_size": len(ALPHABET) + 1})
    task_kwargs = property(lambda self: {"blank_id": 0, "alphabet": ALPHABET})

    def transcripts(self, split):
        return [i["text"] for i in self.splits[split]]

    def utterance_ids(self, split):
        return [i["id"] for i in self.splits[split]]

    def decode(self, ids):
        return text_of(ids)

    def probe_batch(self, n):
        return collate(self.splits["valid"][:n])

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self.splits["valid"], batch_size=5, collate_fn=collate)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=5, collate_fn=collate)


class FrameClassifier(nn.Module):
    """The model contract at its smallest: per-frame logits, one output frame per input frame."""

    def __init__(self, input_dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, vocab_size)

    def forward(self, features, lengths):
        return self.proj(features), lengths


def read_tsv(path: Path) -> tuple[str, list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """The task trained 60 steps on the doubles, validated on its final weights and evaluated on the test split."""
    out = tmp_path_factory.mktemp("asr_fake_run")
    torch.manual_seed(0)
    data = FakeSpeechData()
    task = ASRTask(FrameClassifier(**data.model_kwargs), **data.task_kwargs, optim={**OPTIM, "lr": 0.1},
                   schedule={"warmup_steps": 0, "decay": "constant"})
    trainer = L.Trainer(max_steps=60, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                        check_val_every_n_epoch=100, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(task, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.validate(task, datamodule=data, verbose=False)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    final = task.final_evaluation(data, out)
    return {"out": out, "data": data, "task": task, "metrics": metrics, "final": final}


def test_val_loss_wer_and_cer_are_the_final_weights_over_the_whole_split(fake_run):
    data, model, metrics = fake_run["data"], fake_run["task"].model.eval(), fake_run["metrics"]
    nll, chars, hypotheses = 0.0, 0, []
    with torch.no_grad():
        for item in data.splits["valid"]:  # one utterance at a time: no padding anywhere
            log_probs = model.proj(item["features"]).double().log_softmax(-1)
            nll += F.ctc_loss(log_probs[:, None], torch.tensor([item["targets"]]), [len(log_probs)],
                              [len(item["targets"])], reduction="sum").item()
            chars += len(item["targets"])
            best = [k for k, _ in itertools.groupby(log_probs.argmax(-1).tolist()) if k != 0]
            hypotheses.append(text_of(best))
    assert metrics["val/loss"] == pytest.approx(nll / chars, rel=1e-4)
    expected = error_rates(hypotheses, data.transcripts("valid"))
    assert metrics["val/wer"] == pytest.approx(expected["wer"], abs=1e-6)
    assert metrics["val/cer"] == pytest.approx(expected["cer"], abs=1e-6)
    assert metrics["val/cer"] < 0.3 and metrics["val/wer"] < 0.7  # the task learnt from its loss (untrained: ~1)
    assert "train/frames_per_s" in metrics and fake_run["task"].headline_metric == "val/wer"


def test_transcripts_val_tsv_holds_every_utterance_and_rescores_to_the_logged_wer(fake_run):
    from torchmetrics.text import CharErrorRate, WordErrorRate

    data, metrics = fake_run["data"], fake_run["metrics"]
    header, rows = read_tsv(fake_run["out"] / "transcripts.val.tsv")
    assert header == TSV_HEADER == "utterance_id\treference\thypothesis"
    assert [r[0] for r in rows] == data.utterance_ids("valid") and [r[1] for r in rows] == data.transcripts("valid")
    assert float(WordErrorRate()([r[2] for r in rows], [r[1] for r in rows])) == pytest.approx(metrics["val/wer"])
    assert float(CharErrorRate()([r[2] for r in rows], [r[1] for r in rows])) == pytest.approx(metrics["val/cer"])


def test_final_evaluation_scores_the_test_split_and_writes_its_transcripts(fake_run):
    data, final = fake_run["data"], fake_run["final"]
    header, rows = read_tsv(fake_run["out"] / "transcripts.test.tsv")
    assert [r[1] for r in rows] == data.transcripts("test") and len(rows) == 10
    rescored = error_rates([r[2] for r in rows], [r[1] for r in rows])
    assert final["metrics"]["test/wer"] == pytest.approx(rescored["wer"])
    assert final["metrics"]["test/cer"] == pytest.approx(rescored["cer"])
    assert final["evaluation"]["test_utterances"] == 10 and final["evaluation"]["transcripts"] == "transcripts.test.tsv"
    assert final["evaluation"]["reference_words"] == sum(len(t.split()) for t in data.transcripts("test"))
    assert math.isfinite(final["metrics"]["test/loss"])


# -- task=asr through the app, on the tiny espeak corpus ---------------------------------------------------

# 25 training utterances at batch 8: 3 steps an epoch, a validation of the 10 dev utterances after each.
FAST = ["task=asr", *TINY_ESPEAK_OVERRIDES, "data.batch_size=8", "data.utterances_per_epoch=null", "model.depth=2",
        "logger=csv",
        "trainer.max_steps=6", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
        "callbacks.diagnostics.every_n_steps=3", "callbacks.diagnostics.probe_size=8"]


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory):
    """SIGMA_REPRO_DATA for this module's runs (and this process): the session's tiny espeak corpus."""
    cache = tiny_espeak_cache(tmp_path_factory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIGMA_REPRO_DATA", str(cache))
        yield cache


@pytest.fixture(scope="module")
def asr_run(speech_cache, tmp_path_factory):
    """One `sigma-repro-train task=asr` run of 6 steps (reparam=none): (runs dir, run dir)."""
    runs = tmp_path_factory.mktemp("asr_runs")
    train(runs, *FAST)
    return runs, only_run_dir(runs)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_task_asr_alone_picks_the_conformer_on_espeak_and_scale_proxy_the_speech_transformer():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["task=asr"], return_hydra_config=True)
        proxy = compose(config_name="train", overrides=["task=asr", "scale=proxy"], return_hydra_config=True)
    assert (cfg.hydra.runtime.choices.model, cfg.hydra.runtime.choices.data) == ("conformer_tiny", "espeak")
    assert cfg.task._target_ == "sigma_repro.tasks.asr.ASRTask"
    assert proxy.model._target_ == "sigma_repro.models.speech.SpeechTransformer"
    assert proxy.model.depth == proxy.proxy.depth and proxy.model.stride == proxy.data.subsampling == 3
    assert proxy.data._target_ == cfg.data._target_ and proxy.data.utterances_per_epoch is None


def test_asr_run_reports_the_final_weights_loss_wer_and_cer_over_the_whole_validation_split(asr_run):
    _, run_dir = asr_run
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["headline_metric"] == {"name": "val/wer", "higher_is_better": False}
    metrics = summary["metrics"]
    assert metrics["train/frames_per_s"] > 0 and summary["data"]["corpus"] == "espeak"
    model, data = final_model_and_data(run_dir)
    dataset = data.dataset("valid")
    nll, chars, hypotheses = 0.0, 0, []
    with torch.no_grad():
        for i in range(len(dataset)):  # one utterance at a time: no padding
            batch = collate_utterances([dataset[i]])
            logits, out_lengths = model(batch["features"], batch["feature_lengths"])
            log_probs = logits[0, : out_lengths[0]].double().log_softmax(-1)
            nll += F.ctc_loss(log_probs[:, None], batch["targets"], out_lengths, batch["target_lengths"],
                              reduction="sum", zero_infinity=True).item()
            chars += int(batch["target_lengths"][0])
            hypotheses.append(data.decode([k for k, _ in itertools.groupby(log_probs.argmax(-1).tolist()) if k != 0]))
    assert metrics["val/loss"] == pytest.approx(nll / chars, rel=1e-4)
    from torchmetrics.text import CharErrorRate, WordErrorRate

    references = data.transcripts("valid")
    assert metrics["val/wer"] == pytest.approx(float(WordErrorRate()(hypotheses, references)), abs=1e-6)
    assert metrics["val/cer"] == pytest.approx(float(CharErrorRate()(hypotheses, references)), abs=1e-6)

    # transcripts.val.tsv: every validation utterance in index order, rescoring to the logged rates
    header, rows = read_tsv(run_dir / "transcripts.val.tsv")
    assert header == TSV_HEADER
    assert [r[0] for r in rows] == data.utterance_ids("valid") and [r[1] for r in rows] == references
    assert [r[2] for r in rows] == hypotheses
    assert float(WordErrorRate()([r[2] for r in rows], [r[1] for r in rows])) == pytest.approx(metrics["val/wer"])

    # the test split, decoded once on the final weights
    header, rows = read_tsv(run_dir / "transcripts.test.tsv")
    assert [r[0] for r in rows] == data.utterance_ids("test") and [r[1] for r in rows] == data.transcripts("test")
    rescored = error_rates([r[2] for r in rows], [r[1] for r in rows])
    assert metrics["test/wer"] == pytest.approx(rescored["wer"])
    assert metrics["test/cer"] == pytest.approx(rescored["cer"])
    assert summary["evaluation"]["test_utterances"] == len(rows) == len(data.transcripts("test"))
    assert summary["evaluation"]["transcripts"] == "transcripts.test.tsv"


def test_the_family_s_entropy_probe_is_a_direct_softmax_of_the_final_model_s_attention(asr_run):
    """The diagnostics callback's last probe (the final weights, on the probe batch the task gives it)
    equals a direct softmax of q·kᵀ of each attention of the final model, padding excluded."""
    _, run_dir = asr_run
    model, data = final_model_and_data(run_dir)
    summary = _summary(run_dir)
    probe = data.probe_batch(summary["config"]["callbacks"]["diagnostics"]["probe_size"])
    ref = direct_probs(model, probe["features"], probe["feature_lengths"])
    saved = load_diagnostics(run_dir / "diagnostics.npz")
    assert saved["layers"].tolist() == list(ref) and len(ref) == 2  # model.depth=2
    assert saved["steps"][-1] == 6
    for i, (probs, real) in enumerate(ref.values()):
        torch.testing.assert_close(torch.as_tensor(saved["attention_entropy"][-1, i]).double(),
                                   direct_entropy(probs, real), atol=1e-5, rtol=0)


def test_a_rerun_of_a_finished_asr_run_returns_the_stored_result(asr_run):
    runs, run_dir = asr_run
    before = (run_dir / "summary.json").read_text(), (run_dir / "transcripts.val.tsv").read_bytes()
    again = train(runs, *FAST)
    assert "stored result" in again.stdout and "val/wer" in again.stdout
    assert ((run_dir / "summary.json").read_text(), (run_dir / "transcripts.val.tsv").read_bytes()) == before


@pytest.mark.parametrize("reparam", ["sigma", pytest.param("sigma_stats", marks=pytest.mark.slow)])
def test_asr_trains_with_sigma_reparam_and_sigma_stats(speech_cache, tmp_path, reparam):
    train(tmp_path, *FAST, f"reparam={reparam}", "trainer.max_steps=3")
    run_dir = only_run_dir(tmp_path)
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and math.isfinite(summary["metrics"]["val/wer"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reparametrised = [k for k in state if ".parametrizations." in k and k.endswith(".original")]
    with (run_dir / "metrics.csv").open(newline="") as f:
        sigma_columns = [c for c in next(csv.reader(f)) if c.startswith("diag/sigma/")]
    # 2 layers x (2 + 2 FFN matrices, attention in_proj and out_proj, 3 conv module matrices) + the two
    # subsampling convolutions, the input projection and the head (which ones: test_speech_model.py)
    assert len(sigma_columns) == 2 * 9 + 4
    assert {"diag/sigma/conformer.conformer_layers.1.self_attn.in_proj", "diag/sigma/head"} <= set(sigma_columns)
    assert len(reparametrised) == len(sigma_columns)  # sigma_stats: the same matrices, σ tracked, W used as it is
    assert "model.conformer.conformer_layers.1.self_attn.parametrizations.in_proj_weight.original" in reparametrised
    assert summary["config"]["reparam"]["stats_only"] is (reparam == "sigma_stats")


@pytest.mark.slow
def test_asr_resumes_exactly_after_a_hard_kill_mid_epoch(speech_cache, tmp_path):
    common = [*FAST, "trainer.deterministic=true", "trainer.max_steps=8", "checkpoint_every_n_steps=2"]
    ref_dir, run_dir = reference_and_killed_run(tmp_path, common, kill_step=5)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # mid-epoch 2
    resumed = train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")
    assert "resuming" in resumed.stdout + resumed.stderr
    ref, got = _summary(ref_dir), _summary(run_dir)
    assert got["status"] == "finished" and got["launches"] == 2
    assert computed_metrics(got) == computed_metrics(ref) and got["loss_spikes"] == ref["loss_spikes"]
    assert got["attention_entropy"] == ref["attention_entropy"]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref_dir / "transcripts.val.tsv").read_bytes() == (run_dir / "transcripts.val.tsv").read_bytes()


@pytest.mark.slow
def test_asr_blow_up_ends_as_diverged_without_a_test_evaluation(speech_cache, tmp_path):
    proc = train(tmp_path, *FAST, "optim=sgd", "optim.lr=1e12", "optim.momentum=0.0")
    run_dir = only_run_dir(tmp_path)
    summary = _summary(run_dir)
    assert summary["status"] == "diverged" and 0 <= summary["diverged_step"] < 6
    assert "Traceback" not in proc.stderr and (run_dir / "DONE.json").exists()
    assert "evaluation" not in summary and not (run_dir / "transcripts.test.tsv").exists()


@pytest.mark.slow
def test_asr_wandb_offline_run_has_the_family_s_tags_and_example_table(speech_cache, tmp_path):
    train(tmp_path, *[o for o in FAST if o != "logger=csv"], "trainer.max_steps=3", "reparam=sigma")
    record = wandb_offline_record(only_run_dir(tmp_path))
    assert {"task:asr", "reparam:sigma", "model:conformer_tiny", "data:espeak"} <= set(record["tags"])
    assert "val/wer" in record["summary"] and "val/examples" in record["summary"]
