"""Depth analyses at small sizes: Admin's output change and Noci et al.'s rank collapse, run through
the real commands, with the numbers checked against the claims and against closed forms."""

import csv
import math

import pytest
import torch

from sigma_repro.analysis import output_change, rank_collapse
from sigma_repro.cli import main
from sigma_repro.diagnostics import token_cosine
from sigma_repro.models.residual import admin_closed_form


def _read(path):
    return list(csv.DictReader(path.open()))


def test_output_change_command_post_ln_grows_and_exceeds_pre_ln(tmp_path):
    code = main(["analysis", "output-change", "--depths", "1,2,4", "--seeds", "1", "--samples", "2",
                 "--schemes", "post-ln,pre-ln,admin-closed-form,deepnorm", "--out", str(tmp_path)])
    assert code == 0
    rows = _read(tmp_path / "output_change.csv")
    change = {(r["scheme"], int(r["layers"])): float(r["relative_change"]) for r in rows}
    omega = {(r["scheme"], int(r["layers"])): float(r["omega_last"]) for r in rows}
    assert change["post-ln", 1] < change["post-ln", 2] < change["post-ln", 4]
    assert change["post-ln", 4] > change["pre-ln", 4]
    assert all(0 < c < 1e-3 for c in change.values())  # ε = 1e-4 moves the output a little, not at all or a lot
    for n in (1, 2, 4):  # the stacks carry the schemes' constants: closed-form ω, DeepNorm α = (2N)^(1/4)
        assert omega["admin-closed-form", n] == pytest.approx(admin_closed_form(2 * n))
        assert omega["deepnorm", n] == pytest.approx((2 * n) ** 0.25)
    md = (tmp_path / "output_change.md").read_text()
    assert "Paper's claim" in md and "Fitted exponents" in md and "git sha" in md
    assert (tmp_path / "output_change.png").stat().st_size > 10_000


def test_fitted_exponent_and_growth_law_on_known_curves():
    depths = [1, 2, 4, 8, 16, 32, 64, 100]
    assert output_change.fitted_exponent(depths, [3.0 * n**0.7 for n in depths]) == pytest.approx(0.7)
    log_all, log_deep = output_change.log_yardstick(depths)
    assert log_deep == pytest.approx(output_change.fitted_exponent(
        [16, 32, 64, 100], [math.log(1 + 2 * n) for n in (16, 32, 64, 100)]))
    assert 0 < log_deep < log_all < 1  # a logarithm flattens with depth
    laws = [output_change.growth_law(p, log_deep) for p in (0.02, log_deep + 0.05, 0.9)]
    assert laws == ["flat", "log-like", "linear"]


def test_output_change_rejects_too_few_depths(capsys):
    assert main(["analysis", "output-change", "--depths", "1,2", "--out", "unused"]) == 2
    assert "at least three distinct depths" in capsys.readouterr().err


def test_rank_collapse_command_tau_keeps_tokens_apart_and_qk_gradients_vanish(tmp_path):
    code = main(["analysis", "rank-collapse", "--at-blocks", "1,8", "--norms", "post", "--rhos", "0,0.5,1",
                 "--dim", "32", "--heads", "2", "--ffn-dim", "64", "--tokens", "16", "--batch", "4", "--seeds", "2",
                 "--out", str(tmp_path)])
    assert code == 0
    rows = _read(tmp_path / "rank_collapse.csv")
    depth = {(float(r["tau"]), int(r["block"])): float(r["token_cosine"]) for r in rows if r["experiment"] == "depth"}
    assert set(depth) == {(1.0, 1), (1.0, 8), (8**-0.5, 1), (8**-0.5, 8)}  # τ = 1/sqrt(L), L = 8 blocks
    assert depth[1.0, 8] > depth[1.0, 1]  # tokens align with depth
    assert depth[1.0, 8] > depth[8**-0.5, 8]  # and τ = 1/sqrt(L) slows it
    align = [r for r in rows if r["experiment"] == "alignment"]
    assert [float(r["token_cosine"]) for r in align] == pytest.approx([0, 0.5, 1], abs=0.1)
    assert float(align[0]["grad_ratio_qv"]) > 0.1
    assert float(align[-1]["grad_ratio_qv"]) <= 1e-7 and float(align[-1]["grad_ratio_kv"]) <= 1e-7
    assert float(align[-1]["grad_v_rel"]) > 0  # the values still learn at collapse
    md = (tmp_path / "rank_collapse.md").read_text()
    assert "Paper's claim" in md and "Token cosine at blocks 1/8" in md
    assert (tmp_path / "rank_collapse.png").stat().st_size > 10_000


def test_aligned_tokens_reach_the_target_cosine_and_collapse_exactly():
    for rho in (0.0, 0.3, 0.8):
        m = rank_collapse.shared_weight(rho)
        assert m**2 / (m**2 + (1 - m) ** 2) == pytest.approx(rho)  # the large-d cosine it inverts
        x = rank_collapse.aligned_tokens(rho, batch=4, tokens=64, dim=512, gen=torch.Generator().manual_seed(0))
        assert float(token_cosine(x)) == pytest.approx(rho, abs=0.02)
        assert x.norm(dim=-1) == pytest.approx(torch.full((4, 64), 512**0.5, dtype=torch.float64))
    x = rank_collapse.aligned_tokens(1.0, batch=2, tokens=5, dim=8, gen=torch.Generator().manual_seed(0))
    assert torch.equal(x, x[:, :1].expand_as(x))  # X = 1sᵀ: every token the same vector
