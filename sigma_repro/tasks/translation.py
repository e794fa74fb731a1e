"""Translation (the deep post-LN MT table): label-smoothed cross-entropy, BLEU and chrF by sacrebleu.

The model is an encoder-decoder, ``model(src (B, S), tgt_in (B, T)) -> logits (B, T, V)``
(``sigma_repro.models.seq2seq``); batches are dicts from ``sigma_repro.data.parallel``:
``src`` (source ids + eos), ``tgt_in`` (bos + target ids), ``tgt_out`` (target ids + eos), all padded
with ``pad_id``, and ``index`` (the pair's place in its split, to find its reference text).

What is logged, per target token (padding excluded):
- ``train/loss``, ``val/loss``: the training objective, cross-entropy with label smoothing ε
  (torch's form, (1 - ε)·NLL + ε·mean over the vocabulary of -log p; fairseq spreads ε over V - 1
  classes instead of V, a difference of ε/V);
- ``train/nll``, ``val/nll``: the plain NLL in nats, comparable across ε (the proxy table reads it:
  BLEU at proxy budgets separates schemes less well);
- ``val/bleu``, ``val/chrf``: sacrebleu's corpus BLEU and chrF of the greedy (``val_decode``)
  translations of ``data.bleu_sentences`` validation pairs against their raw reference text;
- ``train/tokens_per_s``: target tokens.

At the end (``final_evaluation``, on the final weights, or on the average of the last
``average_last`` weight snapshots as Admin's recipe averages its last 10 checkpoints): the test split
translated with beam search (``beam_size``, ``lenpen``), ``test/bleu`` and ``test/chrf``, every
sentence written to ``translations.test.tsv`` in the run dir, and sacrebleu's signatures in the summary.

Admin (``model.scheme=admin``): ω is profiled once, before the first step, on a real batch (the fixed
probe batch of validation pairs, the same on every DDP rank so that all ranks get the same ω), and
kept in checkpoints with the flag that says so, so a resumed run does not profile again.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from sigma_repro.data.tokenizers import write_atomically
from sigma_repro.errors import ConfigError
from sigma_repro.tasks.base import StabilityTask

DECODERS = ("greedy", "beam")
SNAPSHOT = re.compile(r"step=(\d+)\.pt")


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """sacrebleu's corpus BLEU and chrF of detokenised ``hypotheses`` against one reference each,
    with the signatures that say how they were computed."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {"bleu": bleu_score.score, "chrf": chrf_score.score, "bleu_text": str(bleu_score),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def _tsv_field(text: str) -> str:
    """One TSV field: tabs and line breaks inside a sentence become spaces."""
    return " ".join(text.replace("\t", " ").splitlines())


class TranslationTask(StabilityTask):
    """Encoder-decoder translation; see the module docstring for what it logs.

    pad_id, bos_id, eos_id: from the data (``task_kwargs``).
    label_smoothing: ε of the training objective (0.1 in Admin's recipe).
    val_decode: "greedy" (default: fast) or "beam" for validation BLEU; the test always uses the beam.
    beam_size, lenpen: the test beam (Admin's recipe: 4 and 0.6, fairseq's length penalty).
    max_len_a, max_len_b: hypotheses stop at a·(source length) + b tokens.
    average_last: average the last N weight snapshots for the final evaluation (0: the final weights);
    average_every: a snapshot every this many optimizer steps (and one of the final weights).
    admin_profile_size: validation pairs in Admin's profiling batch.
    """

    headline_metric, higher_is_better = "val/bleu", True

    def __init__(self, model: nn.Module, *, pad_id: int, bos_id: int, eos_id: int, label_smoothing: float = 0.1,
                 val_decode: str = "greedy", beam_size: int = 4, lenpen: float = 0.6, max_len_a: float = 1.5,
                 max_len_b: int = 10, average_last: int = 0, average_every: int = 100,
                 admin_profile_size: int = 64, **kwargs: Any):
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing must be in [0, 1), found {label_smoothing!r}")
        if val_decode not in DECODERS:
            raise ConfigError(f"task.val_decode must be one of {list(DECODERS)}, found {val_decode!r}")
        for key, value, smallest in (("beam_size", beam_size, 1), ("max_len_b", max_len_b, 0),
                                     ("average_last", average_last, 0), ("average_every", average_every, 1),
                                     ("admin_profile_size", admin_profile_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise ConfigError(f"task.{key} must be a whole number >= {smallest}, found {value!r}")
        if not max_len_a >= 0:
            raise ConfigError(f"task.max_len_a must be >= 0, found {max_len_a!r}")
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self._val_hypotheses: dict[int, str] = {}
        self._bleu_indices: set[int] = set()

    # -- training and validation --------------------------------------------------------------
    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(src, tgt_in)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(label-smoothed loss, NLL) per target token, and the number of target tokens."""
        logits = self.model(batch["src"], batch["tgt_in"]).float().flatten(0, 1)  # (B·T, V)
        target = batch["tgt_out"].flatten()  # (B·T,)
        real = target != self.hparams.pad_id
        # one log-softmax for both (over a 6k-32k vocabulary it is a large share of the step):
        # F.cross_entropy(label_smoothing=ε) is (1 - ε)·NLL + ε·mean over the vocabulary of -log p
        log_probs = F.log_softmax(logits[real], dim=-1)  # (N, V), the N real target tokens
        nll = -log_probs.gather(1, target[real, None]).squeeze(1)  # (N,)
        epsilon = self.hparams.label_smoothing
        loss = ((1 - epsilon) * nll - epsilon * log_probs.mean(dim=-1)).mean()
        return loss, nll.mean().detach(), int(real.sum())

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, nll, _ = self._losses(batch)
        return loss, {"nll": nll}

    def batch_size_units(self, batch: dict[str, torch.Tensor]) -> tuple[int, str]:
        return int((batch["tgt_out"] != self.hparams.pad_id).sum()), "tokens"

    def on_train_start(self) -> None:
        if getattr(self.model, "needs_admin_profile", False):
            args, _ = self.probe_inputs(self.hparams.admin_profile_size)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.hparams.seed)  # the same dropout masks on every DDP rank: the same ω
                omega = self.model.profile_admin(*args)
            values = list(omega.values())
            rank_zero_info(f"sigma-repro: Admin ω profiled on {args[0].shape[0]} validation pairs: {len(values)} "
                           f"sublayers, ω from {min(values):.3f} to {max(values):.3f}")

    def on_validation_epoch_start(self) -> None:
        self._val_hypotheses = {}
        self._bleu_indices = set(self.trainer.datamodule.bleu_indices("valid"))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, nll, tokens = self._losses(batch)
        # weighted by target tokens, so the epoch value is the per-token mean over the whole split
        self.log("val/loss", loss, on_epoch=True, batch_size=tokens, sync_dist=True)
        self.log("val/nll", nll, on_epoch=True, batch_size=tokens, sync_dist=True, prog_bar=True)
        rows = [i for i, index in enumerate(batch["index"].tolist()) if index in self._bleu_indices]
        if rows:
            src = batch["src"][rows]
            for index, ids in zip(batch["index"][rows].tolist(), self._decode(src, self.hparams.val_decode)):
                self._val_hypotheses[index] = self.trainer.datamodule.decode(ids)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        hypotheses = self.gather_by_index(self._val_hypotheses)  # each DDP rank decoded its share
        if not hypotheses:
            return
        references = self.trainer.datamodule.references("valid")
        order = sorted(hypotheses)
        scores = corpus_scores([hypotheses[i] for i in order], [references[i] for i in order])
        # every rank holds the same scores: no sync needed
        self.log("val/bleu", scores["bleu"], on_epoch=True, prog_bar=True, rank_zero_only=False)
        self.log("val/chrf", scores["chrf"], on_epoch=True, rank_zero_only=False)

    def _decode(self, src: torch.Tensor, how: str) -> list[list[int]]:
        from sigma_repro.models.decoding import beam_search, greedy_decode

        hp = self.hparams
        common = dict(bos_id=hp.bos_id, eos_id=hp.eos_id, max_len_a=hp.max_len_a, max_len_b=hp.max_len_b)
        if how == "greedy":
            return greedy_decode(self.model, src, **common)
        return beam_search(self.model, src, beam_size=hp.beam_size, lenpen=hp.lenpen, **common)

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        batch = self.trainer.datamodule.probe_batch(n)
        return (batch["src"].to(self.device), batch["tgt_in"].to(self.device)), {}

    # -- weight snapshots for averaging ----------------------------------------------------------
    def _snapshot_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "checkpoints" / "average"

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.hparams.average_last and self.global_step % self.hparams.average_every == 0:
            self._save_snapshot()

    def on_train_end(self) -> None:
        if self.hparams.average_last:
            self._save_snapshot()  # the final weights are the newest snapshot

    def _save_snapshot(self) -> None:
        """The model's weights at this step to ``checkpoints/average/step=<N>.pt`` (rank 0), keeping the
        ``average_last`` newest. An exact resume writes the same bytes again for steps it repeats."""
        if not self.trainer.is_global_zero:
            return
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, buffer)
        # a kill mid-write leaves no half snapshot under a snapshot's name
        write_atomically(self._snapshot_dir() / f"step={self.global_step:08d}.pt", buffer.getvalue())
        for old in self._snapshots()[: -self.hparams.average_last]:
            old.unlink(missing_ok=True)

    def _snapshots(self) -> list[Path]:
        """Snapshot files up to the current step, oldest first (later ones are left by an earlier launch
        that went past this run's end: never averaged)."""
        found = []
        for path in self._snapshot_dir().glob("step=*.pt"):
            match = SNAPSHOT.fullmatch(path.name)
            if match and int(match.group(1)) <= self.global_step:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    # -- the final evaluation (called by the app on the final weights) ---------------------------
    @torch.no_grad()
    def final_evaluation(self, datamodule: Any, out: Path) -> dict[str, Any]:
        """Translate the test split with the beam; returns ``{"metrics": {"test/bleu", "test/chrf"},
        "evaluation": {...}}`` and writes ``translations.test.tsv`` (rank 0)."""
        averaged = self._averaged_paths()
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if averaged else None
        was_training = self.model.training
        self.model.eval()
        try:
            if averaged:
                self.model.load_state_dict(average_state_dicts(averaged))
                refit_sigma(self.model)
            hypotheses: dict[int, str] = {}
            for batch in datamodule.test_dataloader():
                src = batch["src"].to(self.device)
                for index, ids in zip(batch["index"].tolist(), self._decode(src, "beam")):
                    hypotheses[index] = datamodule.decode(ids)
        finally:
            if saved is not None:
                self.model.load_state_dict(saved)
            self.model.train(was_training)
        references, sources = datamodule.references("test"), datamodule.sources("test")
        order = sorted(hypotheses)
        scores = corpus_scores([hypotheses[i] for i in order], [references[i] for i in order])
        if self.trainer.is_global_zero:
            lines = ["source\treference\thypothesis"] + [
                "\t".join(_tsv_field(t) for t in (sources[i], references[i], hypotheses[i])) for i in order]
            write_atomically(out / "translations.test.tsv", ("\n".join(lines) + "\n").encode("utf-8"))
        hp = self.hparams
        return {
            "metrics": {"test/bleu": scores["bleu"], "test/chrf": scores["chrf"]},
            "evaluation": {
                "test_sentences": len(order), "decode": "beam", "beam_size": hp.beam_size, "lenpen": hp.lenpen,
                "max_len": f"{hp.max_len_a} * source length + {hp.max_len_b}", "bleu": scores["bleu_text"],
                "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"],
                "averaged_snapshots": [str(p.relative_to(out)) for p in averaged],
                "translations": "translations.test.tsv",
            },
        }

    def _averaged_paths(self) -> list[Path]:
        if not self.hparams.average_last:
            return []
        return self._snapshots()[-self.hparams.average_last:]


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the floating-point tensors of several state dicts (fairseq's
    average_checkpoints); other tensors (flags, counters) are taken from the newest."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    mean = {}
    for key, newest in states[-1].items():
        if newest.is_floating_point():
            mean[key] = sum(s[key].double() for s in states).div(len(states)).to(newest.dtype)
        else:
            mean[key] = newest
    return mean


def refit_sigma(model: nn.Module) -> None:
    """σ, u, v of every σReparam matrix fitted exactly (SVD) to its weight, γ kept: after averaging,
    the averaged σ buffers are not the σ of the averaged weights, and eval mode never steps."""
    from sigma_repro.reparam import iter_sigma_reparam

    modules = dict(model.named_modules())
    for name, reparam in iter_sigma_reparam(model):
        module_name, tensor_name = name.rsplit(".", 1)
        weight = modules[module_name].parametrizations[tensor_name].original
        gamma = reparam.gamma.detach().clone()
        reparam.reset(weight)
        with torch.no_grad():
            reparam.gamma.copy_(gamma)
