"""Speech recognition (the ASR table): CTC over characters, WER and CER by torchmetrics.

The model maps log-mel features to per-frame logits, ``model(features (B, T, F), lengths (B,)) ->
(logits (B, T', V), out_lengths (B,))`` (``sigma_repro.models.speech``; positions past
``out_lengths`` are padding); batches are dicts from ``sigma_repro.data.speech``: ``features``,
``feature_lengths``, ``targets`` (label ids, padded), ``target_lengths`` and ``index`` (the
utterance's place in its split, to find its reference text and id). The data owns the vocabulary:
``blank_id`` and ``alphabet`` come from it (``task_kwargs``), label ids back to text through
``datamodule.decode``.

What is logged:
- ``train/loss``, ``val/loss``: CTC loss (``F.ctc_loss`` on an fp32 log-softmax, ``zero_infinity``:
  an utterance with more labels than its output frames can hold adds 0, not inf) per reference
  character, the batch's sum over the sum of its target lengths; ``val/loss`` is that mean over the
  whole validation split;
- ``val/wer`` (the headline, lower is better), ``val/cer``: torchmetrics ``WordErrorRate`` and
  ``CharErrorRate`` of the greedy CTC transcripts of the validation utterances (the whole split unless
  the data's ``val_utterances`` picks fewer) against their reference text, corpus-level (errors summed over utterances over reference words or characters);
- ``train/frames_per_s``: input feature frames (padding excluded) per second of training wall time.

Each validation also writes every transcript to ``transcripts.val.tsv`` in the run dir (rank 0, atomic:
utterance id, reference, hypothesis; one header line), and logs ``log_examples`` of them, the same
utterances every time, as a table to W&B when a WandbLogger is attached.

At the end (``final_evaluation``, on the final weights): the test split decoded the same way,
``test/loss``, ``test/wer``, ``test/cer``, every utterance in ``transcripts.test.tsv``, and the
counts behind the rates in the summary's ``evaluation``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sigma_repro.data.base import evenly_spaced
from sigma_repro.data.tokenizers import write_atomically
from sigma_repro.errors import ConfigError
from sigma_repro.tasks.base import StabilityTask

DECODINGS = ("greedy",)
TSV_HEADER = "utterance_id\treference\thypothesis"


def ctc_loss_per_char(logits: torch.Tensor, out_lengths: torch.Tensor, targets: torch.Tensor,
                      target_lengths: torch.Tensor, blank_id: int) -> tuple[torch.Tensor, int]:
    """(CTC loss summed over the batch / total target length, total target length) of logits (B, T', V)."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T', B, V), fp32 also under autocast
    total = F.ctc_loss(log_probs, targets, out_lengths, target_lengths, blank=blank_id, reduction="sum",
                       zero_infinity=True)
    chars = int(target_lengths.sum())
    return total / max(chars, 1), chars


def greedy_ctc_decode(logits: torch.Tensor, out_lengths: torch.Tensor, blank_id: int) -> list[list[int]]:
    """Best path per utterance: the argmax label of each valid frame, repeats merged, blanks dropped."""
    best = logits.argmax(dim=-1).cpu()  # (B, T')
    decoded = []
    for path, length in zip(best, out_lengths.tolist()):
        merged = torch.unique_consecutive(path[:length])
        decoded.append(merged[merged != blank_id].tolist())
    return decoded


def error_rates(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus WER and CER by torchmetrics: edit operations summed over utterances, over the total
    number of reference words (characters)."""
    from torchmetrics.text import CharErrorRate, WordErrorRate

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return {"wer": float(WordErrorRate()(hypotheses, references)),
            "cer": float(CharErrorRate()(hypotheses, references))}


def transcripts_tsv(ids: list[str], references: list[str], hypotheses: list[str]) -> bytes:
    """The TSV file of a split's transcripts: a header, then utterance id, reference, hypothesis per line."""
    lines = [TSV_HEADER] + ["\t".join(row) for row in zip(ids, references, hypotheses)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def log_example_table(loggers: list, key: str, rows: list[list[str]], step: int) -> None:
    """``rows`` (utterance id, reference, hypothesis) as a table under ``key`` in every W&B logger."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(key=key, columns=["utterance_id", "reference", "hypothesis"], data=rows, step=step)


class ASRTask(StabilityTask):
    """CTC speech recognition; see the module docstring for what it logs.

    blank_id, alphabet: from the data (``task_kwargs``): the CTC blank's label id, and the characters
        the other ids stand for (the vocabulary is the blank plus the alphabet).
    decoding: how transcripts are read from the logits: "greedy" (best path; the only one so far).
    log_examples: validation transcripts logged to W&B at each validation (0: none), evenly spaced
        over the validation split, the same utterances every time.
    """

    headline_metric, higher_is_better = "val/wer", False

    def __init__(self, model: nn.Module, *, blank_id: int, alphabet: str, decoding: str = "greedy",
                 log_examples: int = 4, **kwargs: Any):
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            raise ConfigError(f"the ASR alphabet must be a non-empty string of distinct characters (one per label), "
                              f"found {alphabet!r}; it comes from the data module's task_kwargs")
        vocab_size = len(alphabet) + 1
        if isinstance(blank_id, bool) or not isinstance(blank_id, int) or not 0 <= blank_id < vocab_size:
            raise ConfigError(f"task.blank_id must be a label id in [0, {vocab_size - 1}] (a vocabulary of the blank "
                              f"and {len(alphabet)} characters), found {blank_id!r}")
        if decoding not in DECODINGS:
            raise ConfigError(f"task.decoding must be one of {list(DECODINGS)}, found {decoding!r}")
        if isinstance(log_examples, bool) or not isinstance(log_examples, int) or log_examples < 0:
            raise ConfigError(f"task.log_examples must be a whole number >= 0, found {log_examples!r}")
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self._val_hypotheses: dict[int, str] = {}

    # -- training and validation --------------------------------------------------------------
    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(features, lengths)

    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        logits, out_lengths = self.model(batch["features"], batch["feature_lengths"])
        loss, chars = ctc_loss_per_char(logits, out_lengths, batch["targets"], batch["target_lengths"],
                                        self.hparams.blank_id)
        return loss, chars, logits, out_lengths

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, _, _, _ = self._loss_and_logits(batch)
        return loss, {}

    def batch_size_units(self, batch: dict[str, torch.Tensor]) -> tuple[int, str]:
        return int(batch["feature_lengths"].sum()), "frames"

    def _transcribe(self, logits: torch.Tensor, out_lengths: torch.Tensor, datamodule: Any) -> list[str]:
        return [datamodule.decode(ids) for ids in greedy_ctc_decode(logits, out_lengths, self.hparams.blank_id)]

    def on_validation_epoch_start(self) -> None:
        self._val_hypotheses = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, chars, logits, out_lengths = self._loss_and_logits(batch)
        # weighted by reference characters: the epoch value is the per-character mean over the split
        self.log("val/loss", loss, on_epoch=True, batch_size=chars, sync_dist=True)
        texts = self._transcribe(logits, out_lengths, self.trainer.datamodule)
        self._val_hypotheses.update(zip(batch["index"].tolist(), texts))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        hypotheses = self.gather_by_index(self._val_hypotheses)  # each DDP rank decoded its share
        if not hypotheses or self.trainer.sanity_checking:
            return
        datamodule = self.trainer.datamodule
        order = sorted(hypotheses)
        all_references = datamodule.transcripts("valid")
        references = [all_references[i] for i in order]
        texts = [hypotheses[i] for i in order]
        rates = error_rates(texts, references)
        # every rank holds the same rates: no sync needed
        self.log("val/wer", rates["wer"], on_epoch=True, prog_bar=True, rank_zero_only=False)
        self.log("val/cer", rates["cer"], on_epoch=True, rank_zero_only=False)
        if self.trainer.is_global_zero:
            all_ids = datamodule.utterance_ids("valid")
            ids = [all_ids[i] for i in order]
            write_atomically(Path(self.trainer.default_root_dir) / "transcripts.val.tsv",
                             transcripts_tsv(ids, references, texts))
            if self.hparams.log_examples:
                picks = evenly_spaced(len(order), self.hparams.log_examples).tolist()
                log_example_table(self.loggers, "val/examples", [[ids[i], references[i], texts[i]] for i in picks],
                             self.global_step)

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        batch = self.trainer.datamodule.probe_batch(n)
        return (batch["features"].to(self.device), batch["feature_lengths"].to(self.device)), {}

    # -- the final evaluation (called by the app on the final weights) ---------------------------
    @torch.no_grad()
    def final_evaluation(self, datamodule: Any, out: Path) -> dict[str, Any]:
        """Decode the test split; returns ``{"metrics": {"test/loss", "test/wer", "test/cer"},
        "evaluation": {...}}`` and writes ``transcripts.test.tsv`` (rank 0)."""
        was_training = self.model.training
        self.model.eval()
        hypotheses: dict[int, str] = {}
        loss_sum, chars_sum = 0.0, 0
        try:
            for batch in datamodule.test_dataloader():
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss, chars, logits, out_lengths = self._loss_and_logits(batch)
                loss_sum, chars_sum = loss_sum + float(loss) * chars, chars_sum + chars
                hypotheses.update(zip(batch["index"].tolist(), self._transcribe(logits, out_lengths, datamodule)))
        finally:
            self.model.train(was_training)
        order = sorted(hypotheses)
        all_references = datamodule.transcripts("test")
        references = [all_references[i] for i in order]
        texts = [hypotheses[i] for i in order]
        rates = error_rates(texts, references)
        if self.trainer.is_global_zero:
            all_ids = datamodule.utterance_ids("test")
            ids = [all_ids[i] for i in order]
            write_atomically(out / "transcripts.test.tsv", transcripts_tsv(ids, references, texts))
        return {
            "metrics": {"test/loss": loss_sum / max(chars_sum, 1), "test/wer": rates["wer"], "test/cer": rates["cer"]},
            "evaluation": {
                "test_utterances": len(order), "decoding": self.hparams.decoding,
                "reference_words": sum(len(r.split()) for r in references),
                "reference_chars": sum(len(r) for r in references),
                "metrics_by": "torchmetrics WordErrorRate / CharErrorRate (corpus-level)",
                "transcripts": "transcripts.test.tsv",
            },
        }
