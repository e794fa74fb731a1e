"""Test-only pieces: a callback injected into real runs through Hydra overrides, and the direct
computations and stand-in modules several test files check against."""

import os
import signal

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


def computed_metrics(summary: dict) -> dict:
    """A run summary's metrics without throughput (``*_per_s``, a wall-clock rate no two runs share):
    what an exactly resumed run must reproduce."""
    return {k: v for k, v in summary["metrics"].items() if not k.endswith("_per_s")}


class KillAtStep(Callback):
    """SIGKILLs the training process once ``trainer.global_step`` reaches ``step``: a real hard kill at
    a deterministic point. It runs before the checkpoint callback of that step, so the last checkpoint
    is the one before ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def direct_entropy(probs, query_valid=None, normalized=False):
    """Per-head mean entropy of (B, H, Tq, Tk) probabilities over valid queries (B, Tq)."""
    probs = probs.double()
    ent = -torch.xlogy(probs, probs).sum(-1)  # (B, H, Tq)
    valid = torch.ones(ent.shape[0], ent.shape[2], dtype=torch.bool) if query_valid is None else query_valid
    valid = valid[:, None, :].expand_as(ent)
    if normalized:
        n_keys = (probs > 0).sum(-1)
        ent = ent / n_keys.clamp_min(2).log()
        valid = valid & (n_keys >= 2)
    return (ent * valid).sum((0, 2)) / valid.sum((0, 2))


def per_head_logit_norms(w_q, w_k, heads, scale):
    """||W_K,h W_Q,hᵀ||₂·scale by explicit per-head products: logits_h = x W_Q,hᵀ W_K,h yᵀ."""
    w_q, w_k = w_q.detach().double(), w_k.detach().double()
    hd = w_q.shape[0] // heads
    return torch.stack([
        torch.linalg.matrix_norm(w_q[h * hd:(h + 1) * hd].T @ w_k[h * hd:(h + 1) * hd], 2) * scale
        for h in range(heads)
    ]).float()


class TappedAttention(nn.Module):
    """Stand-in for sigma_repro.models.attention: the q_tap/k_tap convention, probabilities kept."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_tap, self.k_tap = nn.Identity(), nn.Identity()
        self.last_key_padding_mask, self.last_causal = None, False

    def forward(self, x, key_padding_mask=None, causal=False):
        self.last_key_padding_mask, self.last_causal = key_padding_mask, causal
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_tap(q), self.k_tap(k)  # (B, H, T, hd)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if causal:
            logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        self.last_probs = logits.softmax(-1)
        return (self.last_probs @ v).transpose(1, 2).reshape(B, T, C)


class ProjAttention(nn.Module):
    """Stand-in for sigma_repro.models.attention.MultiHeadAttention: separate q/k/v/out_proj, taps."""

    def __init__(self, dim=16, num_heads=2, kdim=None, scale=None):
        super().__init__()
        kdim = kdim or dim
        self.num_heads, self.scale = num_heads, scale or (dim // num_heads) ** -0.5
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(kdim, dim)
        self.v_proj, self.out_proj = nn.Linear(kdim, dim), nn.Linear(dim, dim)
        self.q_tap, self.k_tap = nn.Identity(), nn.Identity()
        self.last_key_padding_mask = self.last_query_padding_mask = None
        self.last_causal = False

    def forward(self, x, context=None, key_padding_mask=None):
        self.last_key_padding_mask = key_padding_mask
        self.last_query_padding_mask = key_padding_mask if context is None else None
        context = x if context is None else context
        (B, Tq, _), Tk, H = x.shape, context.shape[1], self.num_heads
        q = self.q_tap(self.q_proj(x).view(B, Tq, H, -1).transpose(1, 2))  # (B, H, Tq, hd)
        k = self.k_tap(self.k_proj(context).view(B, Tk, H, -1).transpose(1, 2))
        v = self.v_proj(context).view(B, Tk, H, -1).transpose(1, 2)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return self.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, Tq, -1))


def assert_loader_resumes_mid_epoch(make_loader, *, epoch: int, after: int, key) -> list:
    """A train loader stopped after ``after`` batches of ``epoch`` and restored from its state_dict
    into a fresh loader (``make_loader()``) yields exactly the rest of the uninterrupted epoch, batches
    compared by ``key(batch)`` (a tensor); its position is then the end of the epoch, and the pass after
    that is whole. Returns the uninterrupted epoch's keys."""

    def at_epoch(loader):
        loader.sampler.set_epoch(epoch)
        return loader

    uninterrupted = [key(b) for b in at_epoch(make_loader())]
    loader = at_epoch(make_loader())
    batches = iter(loader)
    for _ in range(after):
        next(batches)
    state = loader.state_dict()
    assert state == {"epoch": epoch, "batches_done": after}
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # saved again before it moves: the same position
    rest = [key(b) for b in at_epoch(resumed)]
    assert len(rest) == len(uninterrupted) - after
    assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[after:]))
    assert resumed.state_dict() == {"epoch": epoch, "batches_done": len(uninterrupted)}
    assert len([key(b) for b in resumed]) == len(uninterrupted)  # the next pass is whole
    return uninterrupted


def final_model_and_data(run_dir):
    """(model with the run's final weights (last.ckpt) in eval mode, data module) of a finished run dir,
    rebuilt from its summary.json as the app built them."""
    import json

    from sigma_repro.train import load_last_weights, rebuild_run

    model, data = rebuild_run(json.loads((run_dir / "summary.json").read_text()))
    return load_last_weights(model, run_dir).eval(), data
