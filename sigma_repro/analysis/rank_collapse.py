"""Rank collapse at init (Noci et al. 2022): token alignment vs depth, and query/key gradients.

At init, tokens align with depth, and aligned tokens starve the queries and keys of gradient;
scaling the residual branches by τ = 1/sqrt(L) keeps the tokens apart.

Two experiments, one table (the ``experiment`` column says which; cells a row has no use for are
empty):

* depth: encoder stacks (``models.transformer.TransformerEncoder``, bidirectional attention) with
  post-LN, pre-LN and no norm, each with τ = 1 and τ = 1/sqrt(L), fed Gaussian tokens
  x ~ N(0, 1)^(B×T×d). ``diagnostics.rank_collapse`` measures ``token_cosine`` (mean cosine
  between distinct tokens, 1 at collapse) and ``residual_ratio`` (||X − mean_t X||_F / ||X||_F, 0 at
  collapse) at every block output of one deep stack; the table keeps the blocks in ``at_blocks``.
* alignment: one self-attention (our ``MultiHeadAttention``, taken from a one-layer encoder stack
  so it has the stacks' init) on inputs X = (1 − m)·noise + m·s that mix per-token noise with one
  token s shared by the sequence, every token rescaled to norm sqrt(d) so that only the alignment
  changes, not the logit scale. For Gaussian noise and s the token cosine is ρ ≈ m²/(m² + (1 − m)²),
  so m = sqrt(ρ)/(sqrt(ρ) + sqrt(1 − ρ)) sweeps ρ from 0 to 1; m = 1 is exact collapse, X = 1sᵀ.
  Loss L = Σ out ⊙ R with a fixed Gaussian R; ``diagnostics.attention_grad_norms`` reads
  ||∂L/∂W_Q||, ||∂L/∂W_K||, ||∂L/∂W_V|| after the backward. Float64, so "exactly 0" is visible.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from sigma_repro.analysis.output_change import seeded_encoder
from sigma_repro.analysis.report import write_report
from sigma_repro.diagnostics import attention_grad_norms, rank_collapse, residual_ratio, token_cosine
from sigma_repro.errors import ConfigError
from sigma_repro.models.residual import NORMS
from sigma_repro.models.transformer import TAU_DEPTHS

NORM_LABELS = {"post": "post-LN", "pre": "pre-LN", "none": "no norm"}
COLUMNS = ("experiment", "norm", "tau", "block", "shared_weight", "token_cosine", "residual_ratio",
           "grad_ratio_qv", "grad_ratio_kv", "grad_q_rel", "grad_v_rel")


def _row(**values) -> dict:
    """A table row: every column, empty where the experiment does not fill it."""
    return {column: values.get(column, "") for column in COLUMNS}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def depth_rows(norms: list[str], at_blocks: list[int], *, dim: int, num_heads: int, ffn_dim: int, tokens: int,
               batch: int, seeds: int, tau_depth: str) -> list[dict]:
    """Token cosine and residual ratio at the output of blocks ``at_blocks`` (1-based) of a
    max(at_blocks)-block encoder, mean over ``seeds`` (init and input), for each norm and τ."""
    depth = max(at_blocks)
    rows = []
    for norm in norms:
        for scaled in (False, True):
            options = dict(dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim, norm=norm,
                           **(dict(scheme="scaled", tau_depth=tau_depth) if scaled else {}))
            per_seed = []
            for seed in range(seeds):
                stack = seeded_encoder(seed, **options)
                x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))  # (B, T, d)
                per_seed.append(rank_collapse(stack, x))  # {"layers.<i>": {"token_cosine", "residual_ratio"}}
            _, sublayer = next(stack.residual_sublayers())  # every sublayer has the same τ
            for block in at_blocks:
                metrics = [m[f"layers.{block - 1}"] for m in per_seed]
                rows.append(_row(experiment="depth", norm=norm, tau=sublayer.tau, block=block,
                                 token_cosine=_mean([m["token_cosine"] for m in metrics]),
                                 residual_ratio=_mean([m["residual_ratio"] for m in metrics])))
    return rows


def shared_weight(rho: float) -> float:
    """m such that (1 − m)·noise + m·s has token cosine ≈ ρ (Gaussian noise and s, large d)."""
    return math.sqrt(rho) / (math.sqrt(rho) + math.sqrt(1 - rho))


def aligned_tokens(rho: float, *, batch: int, tokens: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T, d) float64 tokens of norm sqrt(d) with token cosine ≈ ρ; exactly equal tokens at ρ = 1."""
    m = shared_weight(rho)
    noise = torch.randn(batch, tokens, dim, generator=gen, dtype=torch.float64)  # (B, T, d)
    shared = torch.randn(batch, 1, dim, generator=gen, dtype=torch.float64)  # (B, 1, d), one token per sequence
    x = (1 - m) * noise + m * shared
    return x * (dim ** 0.5 / x.norm(dim=-1, keepdim=True))


def alignment_rows(rhos: list[float], *, dim: int, num_heads: int, tokens: int, batch: int, seeds: int) -> list[dict]:
    """Gradient norms of one attention's W_Q, W_K, W_V as its input tokens align.

    The norms (and the input's token cosine and residual ratio) are averaged over seeds before the
    ratios are taken; grad_q_rel and grad_v_rel are ||∂L/∂W_Q|| and ||∂L/∂W_V|| divided by their
    values at the first ρ (0 from the command line).
    """
    rows, reference = [], None
    for rho in rhos:
        measured = []
        for seed in range(seeds):
            stack = seeded_encoder(seed, dim=dim, depth=1, num_heads=num_heads, ffn_dim=dim)
            attn = stack.layers[0].self_attn.sublayer.double()  # the MultiHeadAttention
            gen = torch.Generator().manual_seed(seed)
            x = aligned_tokens(rho, batch=batch, tokens=tokens, dim=dim, gen=gen)  # (B, T, d)
            target = torch.randn(x.shape, generator=gen, dtype=torch.float64)  # (B, T, d), fixed per seed
            (attn(x) * target).sum().backward()
            (grads,) = attention_grad_norms(attn).values()
            measured.append([token_cosine(x).item(), residual_ratio(x).item(), grads["q"], grads["k"], grads["v"]])
        cosine, residual, q, k, v = torch.tensor(measured, dtype=torch.float64).mean(0).tolist()
        reference = reference or (q, v)
        rows.append(_row(experiment="alignment", shared_weight=shared_weight(rho), token_cosine=cosine,
                         residual_ratio=residual, grad_ratio_qv=q / v, grad_ratio_kv=k / v,
                         grad_q_rel=q / reference[0], grad_v_rel=v / reference[1]))
    return rows


def measure(norms: list[str], at_blocks: list[int], rhos: list[float], *, dim: int, num_heads: int, ffn_dim: int,
            tokens: int, batch: int, seeds: int, tau_depth: str) -> list[dict]:
    """The depth rows, then the alignment rows (see the module docstring)."""
    return (depth_rows(norms, at_blocks, dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, tokens=tokens, batch=batch,
                       seeds=seeds, tau_depth=tau_depth)
            + alignment_rows(rhos, dim=dim, num_heads=num_heads, tokens=tokens, batch=batch, seeds=seeds))


def plot(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cos, ax_res, ax_grad) = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    depth = [r for r in rows if r["experiment"] == "depth"]
    colors = dict(zip(NORMS, ("tab:red", "tab:blue", "tab:green")))
    for norm in dict.fromkeys(r["norm"] for r in depth):
        for tau in dict.fromkeys(r["tau"] for r in depth if r["norm"] == norm):
            rs = [r for r in depth if r["norm"] == norm and r["tau"] == tau]
            style = dict(color=colors[norm], marker="o", ms=3, ls="-" if tau == 1 else "--",
                         label=f"{NORM_LABELS[norm]}, τ = {tau:.3g}")
            ax_cos.plot([r["block"] for r in rs], [r["token_cosine"] for r in rs], **style)
            ax_res.plot([r["block"] for r in rs], [r["residual_ratio"] for r in rs], **style)
    ax_cos.set(xscale="log", xlabel="block", ylabel="mean cosine between tokens", title="(a) token alignment at init")
    ax_res.set(xscale="log", yscale="log", xlabel="block", ylabel="||X − mean_t X||_F / ||X||_F",
               title="(a) residual ratio at init")
    ax_cos.legend(fontsize=7)
    align = [r for r in rows if r["experiment"] == "alignment"]
    rho = [r["token_cosine"] for r in align]
    ratio0 = align[0]["grad_ratio_qv"]
    ax_grad.plot(rho, [r["grad_ratio_qv"] / ratio0 for r in align], "o-", ms=4,
                 label="||∂W_Q|| / ||∂W_V||, ÷ value at ρ≈0")
    ax_grad.plot(rho, [r["grad_q_rel"] for r in align], "s-", ms=3, label="||∂W_Q||, ÷ value at ρ≈0")
    ax_grad.plot(rho, [r["grad_v_rel"] for r in align], "^-", ms=3, label="||∂W_V||, ÷ value at ρ≈0")
    ax_grad.plot([0, 1], [1, 0], "k:", lw=1, label="1 − ρ")
    ax_grad.set(xlabel="token cosine ρ of the attention input", ylabel="relative gradient norm",
                title="(b) one attention layer, inputs aligned to ρ")
    ax_grad.legend(fontsize=7)
    for ax in (ax_cos, ax_res, ax_grad):
        ax.grid(alpha=0.3, which="both")
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--at-blocks", default="1,2,4,8,16,32,64",
                        help="blocks (1-based) whose outputs are tabulated; the stack has max(at-blocks) blocks")
    parser.add_argument("--norms", default=",".join(NORMS), help=f"subset of {','.join(NORMS)}")
    parser.add_argument("--rhos", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.99,1",
                        help="target token cosines of the attention input (ascending in [0, 1], from 0)")
    parser.add_argument("--dim", type=int, default=64, help="model width d")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--ffn-dim", type=int, default=256, help="FFN hidden width")
    parser.add_argument("--tokens", type=int, default=32, help="sequence length T")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch B")
    parser.add_argument("--seeds", type=int, default=5, help="inits and input batches averaged per point")
    parser.add_argument("--tau-depth", default="blocks", choices=TAU_DEPTHS,
                        help="L of τ = 1/sqrt(L): blocks (Noci et al.'s layers) or residual sublayers (2 per block)")
    parser.add_argument("--out", default="results/analysis", help="directory for the table and plot")


def run(args: argparse.Namespace) -> int:
    at_blocks = sorted({int(b) for b in args.at_blocks.split(",")})
    norms = args.norms.split(",")
    rhos = [float(r) for r in args.rhos.split(",")]
    if min(at_blocks) < 1:
        raise ConfigError(f"--at-blocks are 1-based block numbers, got {at_blocks}")
    if any(n not in NORMS for n in norms):
        raise ConfigError(f"--norms must be among {list(NORMS)}, got {norms}")
    if len(rhos) < 2 or rhos != sorted(rhos) or rhos[0] != 0 or rhos[-1] > 1:
        raise ConfigError(f"--rhos must be at least two ascending values in [0, 1] starting at 0 (the reference of "
                          f"grad_q_rel and grad_v_rel), got {rhos}")
    rows = measure(norms, at_blocks, rhos, dim=args.dim, num_heads=args.heads, ffn_dim=args.ffn_dim,
                   tokens=args.tokens, batch=args.batch, seeds=args.seeds, tau_depth=args.tau_depth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "rank_collapse.png")
    path = write_report(
        out, "rank_collapse",
        title="Rank collapse at init and the query/key gradients (Noci et al. 2022)",
        claim="at init, token representations align with depth (toward rank collapse, X = 1xᵀ); as the token "
              "correlation ρ grows the gradients of queries and keys vanish while those of values do not: "
              "||∂L/∂W_Q|| / ||∂L/∂W_V|| falls roughly like 1 − ρ and is exactly 0 at collapse. Scaling every "
              "residual branch, x + τ·f(x) with τ = 1/sqrt(L), keeps the tokens from aligning.",
        method=f"(depth) encoder stacks of {max(at_blocks)} blocks, d={args.dim}, {args.heads} heads, FFN "
               f"{args.ffn_dim} (ReLU), xavier init, norm {'/'.join(norms)}, τ = 1 or 1/sqrt(L) with L = "
               f"{args.tau_depth} (both residual branches of every block are scaled; L counts "
               f"{'blocks' if args.tau_depth == 'blocks' else 'residual branches, 2 per block'}); Gaussian tokens "
               f"{args.batch}×{args.tokens}; token cosine and residual ratio of each block output (eval, no "
               f"grad), mean of {args.seeds} seeds; table at blocks {at_blocks}. (alignment) one self-attention "
               f"with the same init on X = (1 − m)·noise + m·s per sequence, tokens rescaled to norm sqrt(d), m "
               f"set for token cosines {rhos}; loss Σ out ⊙ R, R Gaussian; ||∂L/∂W||_F of W_Q, W_K, W_V, mean of "
               f"{args.seeds} seeds, float64; token_cosine there is the measured ρ of X, grad_q_rel / grad_v_rel "
               f"are ||∂W_Q|| and ||∂W_V|| over their values at the first ρ.",
        findings=findings(rows),
        rows=rows, figure="rank_collapse.png",
    )
    print(path.read_text())
    return 0


def findings(rows: list[dict]) -> str:
    """The numbers behind each half of the claim, and where they disagree with it."""
    depth = [r for r in rows if r["experiment"] == "depth"]
    align = [r for r in rows if r["experiment"] == "alignment"]
    return " ".join(([_depth_findings(depth)] if depth else []) + ([_alignment_findings(align)] if align else []))


def _depth_findings(depth: list[dict]) -> str:
    blocks = sorted({r["block"] for r in depth})
    first, last = blocks[0], blocks[-1]
    shown = sorted({first, min(blocks, key=lambda b: abs(b - last / 4)), last})  # 1/16/64 by default
    cos = {(r["norm"], r["tau"] == 1, r["block"]): r["token_cosine"] for r in depth}
    res = {(r["norm"], r["tau"] == 1, r["block"]): r["residual_ratio"] for r in depth}
    norms = list(dict.fromkeys(r["norm"] for r in depth))
    curves = [f"{NORM_LABELS[n]}, τ = {'1' if plain else '1/sqrt(L)'}: "
              + " → ".join(f"{cos[n, plain, b]:.3f}" for b in shown)
              + f" (residual ratio {res[n, plain, last]:.3g} at block {last})"
              for n in norms for plain in (True, False)]
    collapsed = [NORM_LABELS[n] for n in norms if cos[n, True, last] > 0.99]
    worst_scaled = max(cos[n, False, last] for n in norms)
    text = [f"Token cosine at blocks {'/'.join(map(str, shown))}: " + "; ".join(curves) + ".",
            f"With τ = 1 the cosine exceeds 0.99 by block {last} for {' and '.join(collapsed) or 'no stack'}; with "
            f"τ = 1/sqrt(L) it stays at most {worst_scaled:.3f} at block {last}: the fix keeps the tokens apart, "
            f"{'as well as' if worst_scaled <= 0.03 else 'though less well than'} in the background measurement "
            f"(≤ 0.03 at block 64 for a post-LN toy that gave 0.018 → 0.506 → 1.000 at blocks 1/16/64 with τ = 1)."]
    if "post" in norms:
        text.append(f"Our post-LN blocks align tokens faster than that toy's from the first block on "
                    f"({cos['post', True, first]:.3f} vs 0.018 at block {first}), so the same τ leaves more "
                    f"alignment at block {last}; the toy's init is not recorded.")
    return " ".join(text)


def _alignment_findings(align: list[dict]) -> str:
    first, last = align[0], align[-1]
    near = {target: min(align, key=lambda r: abs(r["token_cosine"] - target)) for target in (0.0, 0.5, 0.9, 1.0)}
    half = near[0.5]
    deviation = max(abs(r["grad_q_rel"] - (1 - r["token_cosine"]) / (1 - first["token_cosine"])) for r in align)
    ratio_half = half["grad_ratio_qv"] / first["grad_ratio_qv"]
    text = ["Gradient ratio ||∂W_Q|| / ||∂W_V||: "
            + ", ".join(f"{r['grad_ratio_qv']:.3g} at ρ = {r['token_cosine']:.3f}"
                        for r in {id(r): r for r in near.values()}.values()) + "."]  # each grid point once
    if last["shared_weight"] == 1:  # X = 1sᵀ exactly
        text.append(f"At collapse ||∂W_Q|| / ||∂W_V|| = {last['grad_ratio_qv']:.2g} and ||∂W_K|| / ||∂W_V|| = "
                    f"{last['grad_ratio_kv']:.2g}: zero to float64 rounding, while ||∂W_V|| is "
                    f"×{last['grad_v_rel']:.3g} its ρ≈0 value.")
    text.append(f"||∂W_Q|| alone {'falls like 1 − ρ, as claimed' if deviation <= 0.1 else 'does not fall like 1 − ρ'} "
                f"(within {deviation:.3f} of (1 − ρ)/(1 − ρ₀), ρ₀ = {first['token_cosine']:.3f}, over the sweep).")
    if ratio_half < 1 - half["token_cosine"]:
        text.append(f"The ratio, though, falls faster than 1 − ρ: at ρ = {half['token_cosine']:.2f} it is "
                    f"{ratio_half:.3f} of its ρ≈0 value, not {1 - half['token_cosine']:.2f}, because ||∂W_V|| grows "
                    f"×{half['grad_v_rel']:.3g} there (W_V's gradient sums the output gradients of all queries, "
                    f"whose inputs add up coherently once the tokens align).")
    return " ".join(text)
