"""The causal-LM family's model and task, against independent computations: no position sees a later
token (every norm placement and residual scheme), σReparam covers exactly the attention and FFN
matrices (not the embeddings, positions, tied head or norms), the entropy probe and the diagnostics
callback match a direct causal softmax of the model's own q·kᵀ, the configs' parameter counts match
the GPT formula, and val/ppl, val/bits_per_byte and train/tokens_per_s match hand computations.

Data is a tiny in-test DataModule (random tokens), so nothing here depends on the text loaders."""

import csv
import itertools
import math

import hydra
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from sigma_repro.converters import SigmaReparamConverter
from sigma_repro.data.base import StabilityDataModule
from sigma_repro.diagnostics import attention_entropy
from sigma_repro.diagnostics.callbacks import AttentionDiagnostics
from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.gpt import GPT
from sigma_repro.models.transformer import FeedForward
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam
from sigma_repro.tasks import base as task_base
from sigma_repro.tasks.classification import ClassificationTask
from sigma_repro.tasks.lm import LanguageModelTask

from .conftest import CONF_DIR
from .helpers import direct_entropy

VOCAB, SEQ = 32, 12
TINY = dict(vocab_size=VOCAB, max_seq_len=SEQ, dim=16, depth=2, num_heads=2, ffn_dim=32)
# Every norm placement with every scheme it allows (sigma_repro.models.residual).
NORM_SCHEMES = [(n, s) for n in ("pre", "post", "none") for s in ("standard", "scaled")] + [
    ("post", "admin"), ("post", "deepnorm"), ("none", "rezero")]


def tiny_gpt(seed=0, **options):
    torch.manual_seed(seed)
    return GPT(**{**TINY, **options}).eval()


# -- causal mask ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,scheme", NORM_SCHEMES, ids=[f"{n}-{s}" for n, s in NORM_SCHEMES])
def test_no_position_sees_a_later_token(norm, scheme):
    model = tiny_gpt(norm=norm, scheme=scheme)
    with torch.no_grad():  # weights large enough that every position visibly reads what it may see
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
            elif name.endswith(".tau"):  # ReZero's branches start at τ = 0 and would mix nothing
                p.fill_(0.5)
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    t = 5
    perturbed = tokens.clone()
    perturbed[:, t] = (tokens[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(perturbed)
    assert before.shape == (3, SEQ, VOCAB)
    # the past is untouched, bit for bit: a masked key's probability is exactly 0
    assert torch.equal(after[:, :t], before[:, :t])
    changed = (after[:, t:] - before[:, t:]).abs().amax(dim=(0, 2))  # (SEQ - t,)
    assert (changed > 1e-3).all(), changed  # position t and every later one read the new token


def test_final_norm_only_for_pre_ln_and_bias_false_drops_every_bias():
    for norm, final in (("pre", nn.LayerNorm), ("post", nn.Identity), ("none", nn.Identity)):
        assert type(tiny_gpt(norm=norm).decoder.final_norm) is final
    for norm in ("pre", "post"):
        model = tiny_gpt(norm=norm, bias=False)
        assert not [name for name, _ in model.named_parameters() if name.endswith(".bias")]
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == 2 * TINY["depth"] + (norm == "pre") and all(m.bias is None for m in norms)
    with_bias = tiny_gpt()
    linears = [m for m in with_bias.decoder.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias is not None for m in linears) and with_bias.head.bias is None


def test_gpt2_init_scales_the_residual_branch_ends_only_for_the_standard_scheme():
    torch.manual_seed(0)
    big = GPT(vocab_size=64, max_seq_len=16, dim=256, depth=8, num_heads=4)
    layer = big.decoder.layers[0]
    attn, ffn = layer.self_attn.sublayer, layer.ffn.sublayer
    assert attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ffn.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for branch_end in (attn.out_proj, ffn.fc2):
        assert branch_end.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert big.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = GPT(vocab_size=64, max_seq_len=16, dim=256, depth=8, num_heads=4, scheme="scaled")
    assert scaled.decoder.layers[0].ffn.sublayer.fc2.weight.std().item() == pytest.approx(0.02, rel=0.05)
    deepnorm = GPT(vocab_size=64, max_seq_len=16, dim=256, depth=8, num_heads=4, norm="post", scheme="deepnorm")
    beta = (8 * 8) ** -0.25  # DeepNorm's decoder-only β, xavier_normal: std = β·sqrt(2 / (256 + 1024))
    fc1 = deepnorm.decoder.layers[0].ffn.sublayer.fc1.weight
    assert fc1.std().item() == pytest.approx(beta * math.sqrt(2 / (256 + 1024)), rel=0.05)


def test_too_long_sequences_and_bad_sizes_are_clear_errors():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match=rf"sequences of {SEQ + 1} tokens.*max_seq_len={SEQ}.*block_size"):
        model(torch.zeros(1, SEQ + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.vocab_size to be an integer >= 1, found 0"):
        GPT(**{**TINY, "vocab_size": 0})
    with pytest.raises(ConfigError, match="needs norm='post'"):
        GPT(**TINY, norm="pre", scheme="deepnorm")


def test_transformer_blocks_are_the_stack_layers_named_from_the_model():
    model = tiny_gpt()
    assert [(name, block) for name, block in model.transformer_blocks()] == [
        (f"decoder.layers.{i}", model.decoder.layers[i]) for i in range(TINY["depth"])]


# -- σReparam coverage ----------------------------------------------------------------------------

def attention_and_ffn_matrices(model):
    """q/k/v/out of every attention and both Linears of every FFN, from the module tree."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            found |= {f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        elif isinstance(module, FeedForward):
            found |= {f"{name}.fc1", f"{name}.fc2"}
    return found


@pytest.mark.parametrize("how", ["apply_sigma_reparam", "converter"])
@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_sigma_reparam_covers_attention_and_ffn_but_not_embeddings_tied_head_or_norms(how, norm):
    model = tiny_gpt(norm=norm)
    expected = attention_and_ffn_matrices(model)
    assert len(expected) == 6 * TINY["depth"]
    model = apply_sigma_reparam(model) if how == "apply_sigma_reparam" else SigmaReparamConverter().convert(model)
    covered = {name.removesuffix(".weight") for name, _ in iter_sigma_reparam(model)}
    assert covered == expected
    for module in (model.tok_emb, model.pos_emb, model.head, *[m for m in model.modules()
                                                                 if isinstance(m, nn.LayerNorm)]):
        assert not parametrize.is_parametrized(module)
    assert model.head.weight is model.tok_emb.weight  # still tied, still the raw embedding


def test_an_untied_head_is_reparameterised():
    model = apply_sigma_reparam(tiny_gpt(tie_weights=False))
    covered = {name.removesuffix(".weight") for name, _ in iter_sigma_reparam(model)}
    assert covered == attention_and_ffn_matrices(model) | {"head"}
    assert not parametrize.is_parametrized(model.tok_emb) and not parametrize.is_parametrized(model.pos_emb)


# -- attention entropy ----------------------------------------------------------------------------

def direct_causal_probs(model, tokens):
    """{attention name: (B, H, T, T) float64}: softmax(q kᵀ / sqrt(head_dim)) with keys after each
    query at -inf, q and k from the module's own q_proj, k_proj on the input it received."""
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
               for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    model.eval()
    with torch.no_grad():
        model(tokens)
        for h in handles:
            h.remove()
        probs = {}
        for name, x in inputs.items():
            attn = model.get_submodule(name)
            B, T, _ = x.shape
            H = attn.num_heads
            q = attn.q_proj(x).double().view(B, T, H, -1).transpose(1, 2)  # (B, H, T, hd)
            k = attn.k_proj(x).double().view(B, T, H, -1).transpose(1, 2)
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
            logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            probs[name] = logits.softmax(-1)
    return probs


@pytest.mark.parametrize("reparam", [False, True], ids=["plain", "sigma"])
def test_entropy_probe_matches_a_direct_causal_softmax(reparam):
    model = tiny_gpt(norm="post")
    if reparam:
        apply_sigma_reparam(model, gamma_init=1.0)  # changes the function, so Ŵ must be what is read
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(2))
    got, got_norm = attention_entropy(model, tokens), attention_entropy(model, tokens, normalized=True)
    ref = direct_causal_probs(model, tokens)
    assert list(got) == [f"decoder.layers.{i}.self_attn.sublayer" for i in range(TINY["depth"])] == list(ref)
    for name, probs in ref.items():
        torch.testing.assert_close(got[name].double(), direct_entropy(probs), atol=1e-5, rtol=0)
        torch.testing.assert_close(got_norm[name].double(), direct_entropy(probs, normalized=True), atol=1e-5, rtol=0)
    assert got_norm[next(iter(ref))].shape == (TINY["num_heads"],)


# -- the task in a real Trainer ---------------------------------------------------------------------

class RandomTokens(StabilityDataModule):
    """Random token blocks: (inputs, targets = inputs shifted left by one), fixed by the seed."""

    def __init__(self, *, train=16, val=8, batch_size=4, bytes_per_token=1.5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        stream = torch.randint(0, VOCAB, (train + val, SEQ + 1), generator=g)
        self.train_set = TensorDataset(stream[:train, :-1], stream[:train, 1:])
        self.val_inputs, self.val_targets = stream[train:, :-1], stream[train:, 1:]
        self.batch_size, self.bytes_per_token = batch_size, bytes_per_token

    @property
    def model_kwargs(self):
        return {"vocab_size": VOCAB, "max_seq_len": SEQ}

    @property
    def task_kwargs(self):
        return {"bytes_per_token": self.bytes_per_token}

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.val_inputs, self.val_targets), batch_size=self.batch_size)

    def probe_batch(self, n):
        return self.val_inputs[:n]


CLOCK_TICK = 0.25  # seconds between two reads of the task's fake clock


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """7 steps of LanguageModelTask (4 batches an epoch, validation after each) with the diagnostics
    callback, on a clock that advances CLOCK_TICK per read; then one validation of the final weights."""
    root = tmp_path_factory.mktemp("lm_fit")
    data = RandomTokens()
    torch.manual_seed(0)
    model = GPT(**data.model_kwargs, dim=16, depth=2, num_heads=2, ffn_dim=32)
    task = LanguageModelTask(model, **data.task_kwargs, optim={"_target_": "torch.optim.AdamW", "lr": 3e-3},
                             schedule={})
    diagnostics = AttentionDiagnostics(every_n_steps=3, probe_size=4, save_dir=str(root))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=7, max_epochs=-1, logger=CSVLogger(root, name="csv"),
                         log_every_n_steps=1, callbacks=[diagnostics], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    ticks = itertools.count(0.0, CLOCK_TICK)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_base, "perf_counter", lambda: next(ticks))
        trainer.fit(task, datamodule=data)
    trainer.validate(task, datamodule=data, verbose=False)
    with open(root / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return task, data, trainer, diagnostics, rows


def test_headline_and_validation_metrics_match_hand_computation(fitted):
    task, data, trainer, _, _ = fitted
    assert (task.headline_metric, task.higher_is_better) == ("val/ppl", False)
    task.model.eval()
    with torch.no_grad():
        logits = task.model(data.val_inputs)
    nll = F.cross_entropy(logits.flatten(0, 1).double(), data.val_targets.flatten()).item()  # nats per token
    got = trainer.callback_metrics
    assert got["val/loss"].item() == pytest.approx(nll, rel=1e-5)
    assert got["val/ppl"].item() == pytest.approx(math.exp(nll), rel=1e-5)
    assert got["val/bits_per_byte"].item() == pytest.approx(nll / math.log(2) / data.bytes_per_token, rel=1e-5)


def test_no_bits_per_byte_without_bytes_per_token_and_bad_values_refused():
    model = tiny_gpt()
    task = LanguageModelTask(model, bytes_per_token=None, optim={}, schedule={})
    batch = (torch.zeros(2, SEQ, dtype=torch.long), torch.ones(2, SEQ, dtype=torch.long))
    _, logs = task.compute_loss(batch, "val")
    assert set(logs) == {"ppl"}
    with pytest.raises(ConfigError, match="bytes_per_token must be a positive number.*found 0"):
        LanguageModelTask(model, bytes_per_token=0, optim={}, schedule={})


def test_tokens_per_second_is_tokens_over_the_time_between_batches(fitted):
    _, data, _, _, rows = fitted
    logged = {int(r["step"]): float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")}
    # 7 batches; the first of each fit and the first after validation (step 4) have no interval yet
    assert sorted(logged) == [1, 2, 3, 5, 6]
    tokens = data.batch_size * SEQ
    assert set(logged.values()) == {tokens / CLOCK_TICK}  # one clock read per batch end


def test_classification_throughput_counts_samples():
    task = ClassificationTask(nn.Linear(4, 3), num_classes=3, optim={}, schedule={})
    assert task.batch_size_units((torch.randn(5, 4), torch.zeros(5, dtype=torch.long))) == (5, "samples")
    lm = LanguageModelTask(tiny_gpt(), optim={}, schedule={})
    assert lm.batch_size_units((torch.zeros(3, 7, dtype=torch.long),) * 2) == (21, "tokens")


def test_diagnostics_callback_entropy_matches_a_direct_causal_softmax(fitted):
    task, data, _, diagnostics, _ = fitted
    history = diagnostics.history
    assert history["steps"][-1] == 7 and history["blocks"] == ["decoder.layers.0", "decoder.layers.1"]
    ref = direct_causal_probs(task.model, data.probe_batch(4))  # the model as fit left it
    assert history["layers"] == list(ref)
    for layer, (name, probs) in enumerate(ref.items()):
        got = torch.tensor(history["attention_entropy"][-1][layer], dtype=torch.float64)
        torch.testing.assert_close(got, direct_entropy(probs), atol=1e-5, rtol=0)


# -- configs -----------------------------------------------------------------------------------------

def gpt_params(V, T, d, L, f, *, bias=True, tied=True):
    """GPT parameter count: embeddings, positions, L x (attention, FFN, two LayerNorms), final LN
    (pre-LN), an untied head."""
    b = 1 if bias else 0
    attention = 4 * (d * d + b * d)
    ffn = d * f + b * f + f * d + b * d
    norms = 2 * (d + b * d)
    return V * d + T * d + L * (attention + ffn + norms) + (d + b * d) + (0 if tied else V * d)


def build_config(name, **data_kwargs):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    assert {"depth", "norm", "scheme"} <= set(cfg.model)
    with torch.device("meta"):  # no memory, no init cost: only the shapes
        return hydra.utils.instantiate(cfg.model, **data_kwargs), cfg.model


@pytest.mark.parametrize("name,V,T", [("gpt_tiny", 256, 128), ("gpt_small", 50257, 1024), ("gpt_small", 256, 1024),
                                      ("gpt_wt103", 267735, 512)])
def test_model_configs_have_the_parameter_count_of_their_shape(name, V, T):
    model, cfg = build_config(name, vocab_size=V, max_seq_len=T)
    got = sum(p.numel() for p in model.parameters())  # the tied weight counts once
    assert got == gpt_params(V, T, cfg.dim, cfg.depth, cfg.ffn_dim)
    assert model.head.weight is model.tok_emb.weight
    if name == "gpt_tiny":
        assert 100_000 < got < 1_000_000  # "a few hundred K": the CPU proxy
    if (name, V) == ("gpt_small", 50257):
        assert got == 124_439_808  # GPT-2 small, the 124M of the GPT-2 release and nanoGPT


def test_untied_and_bias_free_counts():
    for bias, tied in itertools.product((True, False), repeat=2):
        model = tiny_gpt(bias=bias, tie_weights=tied)
        assert sum(p.numel() for p in model.parameters()) == gpt_params(
            VOCAB, SEQ, TINY["dim"], TINY["depth"], TINY["ffn_dim"], bias=bias, tied=tied)
