"""The translation family through the app, as FAMILIES.md §1 asks of every family: ``task=translation``
alone trains on the embedded gettext pairs; the summary's validation loss, NLL and BLEU are the final
weights', recomputed here from the checkpoint with sacrebleu; the test translations in
``translations.test.tsv`` rescore to the summary's test BLEU; ``sigma-repro translate`` reproduces them;
Admin's ω survives a hard kill (profiled once); a blow-up ends as ``diverged``; W&B tags name the family."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from sigma_repro.models.decoding import greedy_decode
from sigma_repro.reparam import iter_sigma_reparam
from sigma_repro.tasks.translation import average_state_dicts, corpus_scores
from sigma_repro.translate import load_translation_run

from .conftest import CONF_DIR, ROOT
from .helpers import computed_metrics
from .test_train import only_run_dir, reference_and_killed_run, train, wandb_offline_record

# A fast run on the synthetic task: tiny model, 20 steps, small validation.
FAST = ["task=translation", "data=synthetic_translation", "logger=csv", "trainer.max_steps=20", "trainer.max_epochs=-1",
        "trainer.enable_progress_bar=false", "callbacks.diagnostics.every_n_steps=10",
        "callbacks.diagnostics.probe_size=8", "model.depth=2", "model.dim=32", "model.ffn_dim=64", "data.batch_size=16",
        "task.admin_profile_size=8"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One data cache for the module: corpora and tokenizers are prepared once."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, data_cache):
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(data_cache))


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_task_translation_alone_picks_the_proxy_encoder_decoder_on_gettext_and_scale_proxy_keeps_them():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["task=translation"], return_hydra_config=True)
        proxy = compose(config_name="train", overrides=["task=translation", "scale=proxy"], return_hydra_config=True)
    assert (cfg.hydra.runtime.choices.model, cfg.hydra.runtime.choices.data) == ("mt_tiny", "gettext_de")
    assert proxy.model._target_ == "sigma_repro.models.seq2seq.Seq2SeqTransformer"
    assert proxy.data._target_ == cfg.data._target_
    assert proxy.model.depth == proxy.proxy.depth


@pytest.mark.parametrize("reparam", ["none", "sigma"])
def test_translation_run_reports_the_final_weights_loss_nll_bleu_and_test_translations(tmp_path, reparam):
    train(tmp_path, *FAST, f"reparam={reparam}")
    run_dir = only_run_dir(tmp_path)
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and summary["steps"] == 20
    assert summary["headline_metric"] == {"name": "val/bleu", "higher_is_better": True}
    metrics = summary["metrics"]
    assert metrics["train/tokens_per_s"] > 0
    # entropy per attention: 2 encoder self-, 2 decoder self- and 2 cross-attentions
    layers = summary["attention_entropy"]["layers"]
    assert len(layers) == 6 and sum("cross_attn" in name for name in layers) == 2

    model, data, _ = load_translation_run(run_dir)
    if reparam == "sigma":  # q, k, v, out and two FFN matrices per encoder layer; plus cross q, k, v, out per decoder layer
        assert len(list(iter_sigma_reparam(model))) == 2 * 6 + 2 * 10
    # val/loss and val/nll: per-token means over the whole validation split, recomputed
    pad = data.task_kwargs["pad_id"]
    smoothing = summary["config"]["task"]["label_smoothing"]
    total_loss = total_nll = tokens = 0.0
    hypotheses = {}
    bleu_rows = set(data.bleu_indices("valid"))
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch["src"], batch["tgt_in"]).flatten(0, 1)
            target = batch["tgt_out"].flatten()
            total_loss += F.cross_entropy(logits, target, ignore_index=pad, label_smoothing=smoothing,
                                          reduction="sum").item()
            total_nll += F.cross_entropy(logits, target, ignore_index=pad, reduction="sum").item()
            tokens += (target != pad).sum().item()
            rows = [i for i, index in enumerate(batch["index"].tolist()) if index in bleu_rows]
            decoded = greedy_decode(model, batch["src"][rows], bos_id=data.task_kwargs["bos_id"],
                                    eos_id=data.task_kwargs["eos_id"])  # the rows the run decoded, as it did
            hypotheses.update({int(batch["index"][i]): data.decode(ids) for i, ids in zip(rows, decoded)})
    assert metrics["val/loss"] == pytest.approx(total_loss / tokens, rel=1e-4)
    assert metrics["val/nll"] == pytest.approx(total_nll / tokens, rel=1e-4)
    references = data.references("valid")
    order = sorted(hypotheses)
    rescored = corpus_scores([hypotheses[i] for i in order], [references[i] for i in order])
    assert metrics["val/bleu"] == pytest.approx(rescored["bleu"], abs=1e-6)
    assert metrics["val/chrf"] == pytest.approx(rescored["chrf"], abs=1e-6)

    # the test split with the beam: every sentence in the TSV, which rescores to the summary's test BLEU
    lines = (run_dir / "translations.test.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "source\treference\thypothesis"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(data.references("test")) == summary["evaluation"]["test_sentences"]
    assert [r[1] for r in rows] == data.references("test")
    tsv_scores = corpus_scores([r[2] for r in rows], [r[1] for r in rows])
    assert metrics["test/bleu"] == pytest.approx(tsv_scores["bleu"], abs=1e-9)
    assert summary["evaluation"]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_translate_command_reproduces_the_runs_test_translations_and_averages_snapshots(tmp_path):
    train(tmp_path, *FAST, "trainer.max_steps=15", "task.average_last=3", "task.average_every=5")
    run_dir = only_run_dir(tmp_path)
    summary = _summary(run_dir)
    snapshots = sorted((run_dir / "checkpoints" / "average").glob("step=*.pt"))
    assert [p.name for p in snapshots] == ["step=00000005.pt", "step=00000010.pt", "step=00000015.pt"]
    assert summary["evaluation"]["averaged_snapshots"] == [str(p.relative_to(run_dir)) for p in snapshots]
    # the average is the element-wise mean of the three snapshots
    states = [torch.load(p, weights_only=True) for p in snapshots]
    mean = average_state_dicts(snapshots)
    key = next(k for k, v in states[0].items() if v.is_floating_point() and v.dim() == 2)
    assert torch.allclose(mean[key], (states[0][key] + states[1][key] + states[2][key]) / 3, atol=1e-7)

    rows = [line.split("\t") for line in
            (run_dir / "translations.test.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    source = tmp_path / "input.txt"
    source.write_text("\n".join(r[0] for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, "-m", "sigma_repro.cli", "translate", str(run_dir), "--input", str(source),
                           "--output", str(out), "--average", "3"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text(encoding="utf-8").splitlines() == [r[2] for r in rows]
    assert f"{len(rows)} sentences (beam 4, lenpen 0.6)" in proc.stderr

    bad = subprocess.run([sys.executable, "-m", "sigma_repro.cli", "translate", str(run_dir), "--input", str(source),
                          "--average", "9"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "--average 9 needs 9 weight snapshots" in bad.stderr and "found 3" in bad.stderr


@pytest.mark.slow
def test_admin_omega_is_profiled_once_and_a_hard_kill_resumes_exactly(tmp_path):
    common = [*FAST, "trainer.deterministic=true", "checkpoint_every_n_steps=5", "model.scheme=admin",
              "model.dropout=0.1"]
    ref_dir, run_dir = reference_and_killed_run(tmp_path, common, kill_step=13)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10 and bool(ckpt["state_dict"]["model.admin_profiled"])
    resumed = train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")
    assert "Admin ω profiled" not in resumed.stdout + resumed.stderr  # ω came from the checkpoint
    ref, got = _summary(ref_dir), _summary(run_dir)
    assert got["launches"] == 2 and computed_metrics(got) == computed_metrics(ref)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    omegas = [k for k in a if k.endswith(".omega")]
    assert omegas and not all(torch.equal(a[k], torch.ones_like(a[k])) for k in omegas)


def test_translation_blow_up_ends_as_diverged_without_a_test_evaluation(tmp_path):
    overrides = [*FAST, "model.norm=none", "optim=sgd", "optim.lr=1e12", "optim.momentum=0.0"]
    proc = train(tmp_path, *overrides)
    run_dir = only_run_dir(tmp_path)
    summary = _summary(run_dir)
    assert summary["status"] == "diverged" and 0 <= summary["diverged_step"] < 20
    assert "Traceback" not in proc.stderr
    assert "evaluation" not in summary and not (run_dir / "translations.test.tsv").exists()


def test_the_default_translation_run_trains_on_the_embedded_gettext_pairs(tmp_path):
    if not list(Path("/usr/share/locale/de/LC_MESSAGES").glob("*.mo")):
        pytest.skip("no German gettext catalogs in /usr/share/locale/de/LC_MESSAGES on this machine")
    train(tmp_path, "task=translation", "logger=csv", "trainer.max_steps=8", "trainer.max_epochs=-1",
          "trainer.enable_progress_bar=false", "data.bleu_sentences=16", "task.beam_size=2")
    summary = _summary(only_run_dir(tmp_path))
    assert summary["status"] == "finished" and summary["data"]["corpus"] == "gettext_de"
    assert summary["config"]["model"]["depth"] == 6
    assert math.isfinite(summary["metrics"]["val/nll"]) and summary["metrics"]["val/nll"] < math.log(
        summary["data"]["vocab_size"])


@pytest.mark.slow
def test_translation_wandb_offline_tags_name_the_family(tmp_path):
    train(tmp_path, *[o for o in FAST if o != "logger=csv"], "trainer.max_steps=6", "reparam=sigma")
    record = wandb_offline_record(only_run_dir(tmp_path))
    assert {"task:translation", "reparam:sigma", "norm:post", "model:mt_tiny",
            "data:synthetic_translation"} <= set(record["tags"])
    assert "val/bleu" in record["summary"]


@pytest.mark.parametrize("option, value, message", [
    ("label_smoothing", 1.0, "task.label_smoothing must be in [0, 1)"),
    ("val_decode", "sample", "task.val_decode must be one of ['greedy', 'beam']"),
    ("beam_size", 0, "task.beam_size must be a whole number >= 1"),
    ("average_last", -1, "task.average_last must be a whole number >= 0"),
    ("average_every", 2.5, "task.average_every must be a whole number >= 1"),
    ("max_len_a", -0.5, "task.max_len_a must be >= 0"),
])
def test_bad_task_options_are_named_before_any_compute(option, value, message):
    from sigma_repro.errors import ConfigError
    from sigma_repro.tasks.translation import TranslationTask

    options = dict(pad_id=0, bos_id=2, eos_id=3, optim={"_target_": "torch.optim.Adam", "lr": 1e-3},
                   schedule={"warmup_steps": 0}, **{option: value})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        TranslationTask(torch.nn.Linear(2, 2), **options)


def test_translate_refuses_what_is_not_a_trained_translation_run(tmp_path):
    def translate(*args):
        return subprocess.run([sys.executable, "-m", "sigma_repro.cli", "translate", *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    text = tmp_path / "in.txt"
    text.write_text("hello world\n", encoding="utf-8")
    missing = translate(tmp_path / "nowhere", "--input", text)
    assert missing.returncode == 2 and "summary.json not found" in missing.stderr
    lm_run = tmp_path / "lm"
    lm_run.mkdir()
    (lm_run / "summary.json").write_text(json.dumps(
        {"config": {"task": {"_target_": "sigma_repro.tasks.lm.LanguageModelTask"}}}))
    other = translate(lm_run, "--input", text)
    assert other.returncode == 2 and "not of task=translation" in other.stderr
    no_input = translate(lm_run, "--input", tmp_path / "absent.txt")
    assert no_input.returncode == 2 and "--input" in no_input.stderr and "not found" in no_input.stderr
    bad_beam = translate(lm_run, "--input", text, "--beam", "0")
    assert bad_beam.returncode == 2 and "--beam and --batch-size must be >= 1" in bad_beam.stderr
