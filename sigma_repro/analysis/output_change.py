"""Output change vs depth (Admin): how much a tiny update of every weight moves a stack's output.

Liu et al. (EMNLP 2020) explain post-LN's instability by amplification: each sublayer's output
leans on its own branch, so a parameter update δ changes the output by E|F(x, W) − F(x, W + δ)|²
= O(N) in the number N of residual sublayers for post-LN, but only O(log N) for pre-LN and for
post-LN with Admin's skip weights ω. We measure it at init with ``diagnostics.output_change``
(δ = ε·sign(N(0, 1)) on every weight except biases, norms and ω/α/τ, the paper's code) on
encoder stacks (``models.transformer.TransformerEncoder``) of growing depth, for every scheme in
``SCHEMES``, relative to E|F|² so that stacks with different output scales compare.

The inputs are Gaussian tokens standing in for embedded sentences: x ~ N(0, 1)^(B×T×d). Admin's
profiled ω come from ``admin_profile`` on a second such batch (its "first training batch"). Stacks
run in float64 so that rounding (~1e-16) stays far below the changes measured (~1e-7).

The growth law is read off a fitted exponent p in change ∝ N^p (least squares of log change on
log N): p ≈ 1 is linear; a logarithm has no fixed exponent, so the report also gives the exponent
of log(1 + N) fitted on the same depths as the "log-like" yardstick.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NamedTuple

import torch

from sigma_repro.analysis.report import write_report
from sigma_repro.diagnostics import output_change
from sigma_repro.errors import ConfigError
from sigma_repro.models.residual import admin_closed_form, admin_profile
from sigma_repro.models.transformer import TAU_DEPTHS, TransformerEncoder


class Scheme(NamedTuple):
    label: str  # how the table and plot name it
    stack: dict  # norm / scheme options of the TransformerEncoder
    profiled: bool = False  # set Admin's ω by admin_profile (else the stack's closed-form init)


SCHEMES = {
    "post-ln": Scheme("post-LN", dict(norm="post")),
    "pre-ln": Scheme("pre-LN", dict(norm="pre")),
    "admin": Scheme("Admin (profiled ω)", dict(norm="post", scheme="admin"), profiled=True),
    "admin-closed-form": Scheme("Admin (closed-form ω)", dict(norm="post", scheme="admin")),
    "deepnorm": Scheme("DeepNorm", dict(norm="post", scheme="deepnorm")),
    "scaled": Scheme("τ-scaled post-LN", dict(norm="post", scheme="scaled")),
}


def seeded_encoder(seed: int, **options) -> TransformerEncoder:
    """``TransformerEncoder(**options)`` initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TransformerEncoder(**options)


def last_skip_weight(stack: TransformerEncoder) -> float:
    """ω of the last residual sublayer (mean over channels for Admin's vector ω; α for DeepNorm)."""
    *_, (_, last) = stack.residual_sublayers()
    return float(torch.as_tensor(last.omega).detach().mean())


def measure(schemes: list[str], depths: list[int], *, dim: int, num_heads: int, ffn_dim: int, tokens: int,
            batch: int, seeds: int, eps: float, samples: int, tau_depth: str) -> list[dict]:
    """One row per (scheme, depth): the relative output change averaged over ``seeds`` stacks
    (each with its own init, input batch and ``samples`` perturbations δ), its range over seeds,
    and the last sublayer's skip weight ω. (Every scheme here ends in a LayerNorm, so E|F|² ≈ 1 and
    the relative change is also the absolute one.)"""
    rows = []
    for name in schemes:
        scheme = SCHEMES[name]
        for depth in depths:
            relative, omega = [], []
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(seed)
                x, profile_batch = torch.randn(2, batch, tokens, dim, generator=gen, dtype=torch.float64)  # (B, T, d)
                stack = seeded_encoder(seed, dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim,
                                       tau_depth=tau_depth, **scheme.stack).double()
                if scheme.profiled:
                    admin_profile(stack, profile_batch)
                result = output_change(stack, x, eps=eps, n_samples=samples, seed=seed)
                relative.append(result.relative)
                omega.append(last_skip_weight(stack))
            rows.append({
                "scheme": name, "layers": depth, "sublayers": 2 * depth,
                "relative_change": sum(relative) / seeds, "relative_min": min(relative),
                "relative_max": max(relative), "omega_last": sum(omega) / seeds,
            })
    return rows


def fitted_exponent(depths: list[float], values: list[float]) -> float:
    """Least-squares slope p of log(value) on log(depth): value ∝ depth^p."""
    xs, ys = [math.log(d) for d in depths], [math.log(v) for v in values]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
            / sum((x - x_mean) ** 2 for x in xs))


def deeper_half(depths: list[int]) -> list[int]:
    """The deeper half of the depths (the middle one included when their number is odd)."""
    return sorted(depths)[len(depths) // 2:]


def exponents(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """{scheme: (exponent over all depths, exponent over the deeper half of the depths)}."""
    fits = {}
    for name in dict.fromkeys(r["scheme"] for r in rows):
        curve = {r["layers"]: r["relative_change"] for r in rows if r["scheme"] == name}
        fits[name] = tuple(fitted_exponent(ds, [curve[n] for n in ds]) for ds in (sorted(curve), deeper_half(curve)))
    return fits


def log_yardstick(depths: list[int]) -> tuple[float, float]:
    """The same two exponents for log(1 + N), N = 2 × layers residual sublayers: what O(log N) looks like."""
    return tuple(fitted_exponent(ds, [math.log(1 + 2 * n) for n in ds]) for ds in (sorted(depths), deeper_half(depths)))


def growth_law(p_deep: float, p_log: float) -> str:
    """The law whose deeper-half exponent is nearest: flat (0), log-like (``p_log``) or linear (1)."""
    return min((abs(p_deep), "flat"), (abs(p_deep - p_log), "log-like"), (abs(p_deep - 1), "linear"))[1]


def plot(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for name in dict.fromkeys(r["scheme"] for r in rows):
        rs = [r for r in rows if r["scheme"] == name]
        n = [r["layers"] for r in rs]
        mean = [r["relative_change"] for r in rs]
        spread = [[m - r["relative_min"] for m, r in zip(mean, rs)], [r["relative_max"] - m for m, r in zip(mean, rs)]]
        ax.errorbar(n, mean, yerr=spread, marker="o", ms=4, capsize=2, label=SCHEMES[name].label)
    post = [r for r in rows if r["scheme"] == "post-ln"] or rows
    n0, c0 = post[0]["layers"], post[0]["relative_change"]  # anchor the references at post-LN's first point
    grid = sorted({r["layers"] for r in rows})
    ax.plot(grid, [c0 * n / n0 for n in grid], "k:", lw=1, label="∝ N (reference)")
    ax.plot(grid, [c0 * math.log(1 + 2 * n) / math.log(1 + 2 * n0) for n in grid], "k--", lw=1,
            label="∝ log(1 + N) (reference)")
    ax.set(xscale="log", yscale="log", xlabel="encoder layers (N = 2 × layers residual sublayers)",
           ylabel="E|F(x,W) − F(x,W+δ)|² / E|F|²", title="Output change at init (mean, min–max over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", default="1,2,4,8,16,32,64,100", help="encoder layers per stack")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"subset of {','.join(SCHEMES)}")
    parser.add_argument("--dim", type=int, default=64, help="model width d")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--ffn-dim", type=int, default=256, help="FFN hidden width")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length T")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch B")
    parser.add_argument("--seeds", type=int, default=5, help="stacks (init + input batch) averaged per point")
    parser.add_argument("--eps", type=float, default=1e-4, help="perturbation size ε (Admin's code: 1e-4)")
    parser.add_argument("--samples", type=int, default=3, help="perturbations δ per stack")
    parser.add_argument("--tau-depth", default="blocks", choices=TAU_DEPTHS,
                        help="L of the scaled scheme's τ = 1/sqrt(L): layers (blocks) or residual sublayers")
    parser.add_argument("--out", default="results/analysis", help="directory for the table and plot")


def run(args: argparse.Namespace) -> int:
    depths = [int(n) for n in args.depths.split(",")]
    schemes = args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ConfigError(f"unknown scheme(s) {unknown}; choose among {list(SCHEMES)}")
    if len(set(depths)) < 3 or min(depths) < 1:
        raise ConfigError(f"--depths needs at least three distinct depths >= 1 (exponents are fitted over all of "
                          f"them and over the deeper half), got {depths}")
    rows = measure(schemes, depths, dim=args.dim, num_heads=args.heads, ffn_dim=args.ffn_dim, tokens=args.tokens,
                   batch=args.batch, seeds=args.seeds, eps=args.eps, samples=args.samples, tau_depth=args.tau_depth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "output_change.png")
    path = write_report(
        out, "output_change",
        title="Output change vs depth at init (Admin's amplification)",
        claim="a small update δ of all weights changes the output of a post-LN transformer by "
              "E|F(x,W) − F(x,W+δ)|² = O(N) in its number N of residual sublayers, of a pre-LN one and of "
              "post-LN with Admin's ω by O(log N) (Liu et al. 2020).",
        method=f"encoder-only stacks (no embedding or output layer; post-LN without, pre-LN with a final "
               f"LayerNorm) of {depths} layers, d={args.dim}, {args.heads} heads, FFN {args.ffn_dim}, xavier "
               f"init; inputs x ~ N(0,1) of {args.batch}×{args.tokens} tokens. δ = {args.eps:g}·sign(N(0,1)) on "
               f"every weight except biases, norms and ω/α/τ; relative change = E|ΔF|²/E|F|², "
               f"{args.samples} draws of δ per stack, mean (min–max) over {args.seeds} seeds of init and inputs, "
               f"float64. Admin: ω profiled by admin_profile on another Gaussian batch, or the closed form "
               f"sqrt((N+1)/ln(N+1) − 1); DeepNorm: single-stack α = (2·layers)^(1/4), β = (8·layers)^(−1/4); "
               f"τ-scaled: post-LN with x + f(x)/sqrt(L), L = {args.tau_depth}. omega_last = ω of the last "
               f"sublayer. Exponent p: least-squares slope of log(change) on log(N).",
        findings=findings(rows),
        rows=rows, figure="output_change.png",
    )
    print(path.read_text())
    return 0


def findings(rows: list[dict]) -> str:
    """The fitted exponents, the growth law each is nearest to, and the verdict on Admin's claim."""
    fits = exponents(rows)
    depths = sorted({r["layers"] for r in rows})
    shallowest, deepest = depths[0], depths[-1]
    deep = deeper_half(depths)
    log_all, log_deep = log_yardstick(depths)
    row = {(r["scheme"], r["layers"]): r for r in rows}
    change = {key: r["relative_change"] for key, r in row.items()}
    law = {name: growth_law(p_deep, log_deep) for name, (_, p_deep) in fits.items()}
    text = [f"Fitted exponents p (change ∝ N^p), over all depths {shallowest}–{deepest} / over the deeper half "
            f"{deep[0]}–{deep[-1]}: "
            + "; ".join(f"{SCHEMES[name].label} {p_all:.2f} / {p_deep:.2f} ({law[name]}, "
                        f"×{change[name, deepest] / change[name, shallowest]:.3g} from {shallowest} to {deepest} "
                        f"layers)" for name, (p_all, p_deep) in fits.items())
            + f". Yardsticks on the same depths: N has p = 1, log(1 + N) has p = {log_all:.2f} / {log_deep:.2f}; "
              f"each scheme is called flat, log-like or linear by the nearest of 0, {log_deep:.2f} and 1 "
              f"(deeper half)."]
    expected = {"post-ln": "linear", "pre-ln": "log-like", "admin": "log-like", "admin-closed-form": "log-like"}
    checked = {name: want for name, want in expected.items() if name in law}
    disagree = [f"{SCHEMES[name].label} is {law[name]}, not {want}" for name, want in checked.items()
                if law[name] != want and not (want == "log-like" and law[name] == "flat")]
    if checked:
        text.append("Admin's claim (post-LN linear, pre-LN and Admin logarithmic or flatter): "
                    + ("reproduced." if not disagree else "not reproduced where " + "; ".join(disagree) + "."))
    if "post-ln" in fits:
        post = row["post-ln", deepest]
        above = [SCHEMES[n].label for n in fits if n != "post-ln" and change["post-ln", deepest] > change[n, deepest]]
        text.append(f"At {deepest} layers post-LN's change is above that of {', '.join(above) or 'no other scheme'}; "
                    f"it varies ×{post['relative_max'] / post['relative_min']:.3g} between seeds there "
                    f"(heavy-tailed), so its deep exponent is the least certain.")
    if "admin" in fits and "pre-ln" in fits:
        gap = max(abs(change["admin", n] / change["pre-ln", n] - 1) for n in depths)
        text.append(f"Profiled Admin's change stays within {gap:.0%} of pre-LN's at every depth; its last ω grows "
                    f"to {row['admin', deepest]['omega_last']:.3g} at {deepest} layers (closed form "
                    f"{admin_closed_form(2 * deepest):.3g}).")
    text.append("Background toy for comparison (6-6 to 48-48 encoder-decoder, change of the logits with embeddings "
                "and output layer perturbed too, ε = 1e-5): over 8× depth post-LN grew ×17 but profiled Admin ×25, "
                "closed-form Admin ×30 and DeepNorm ×12, i.e. no scheme was log-like there.")
    eightfold = [n for n in depths if 8 * n in depths]
    if eightfold:
        n = eightfold[-1]
        text.append(f"Ours over 8× depth ({n} to {8 * n} layers): "
                    + ", ".join(f"{SCHEMES[name].label} ×{change[name, 8 * n] / change[name, n]:.3g}" for name in fits)
                    + ".")
    return " ".join(text)
