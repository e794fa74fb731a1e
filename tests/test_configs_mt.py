"""The mt_depth table composes: every cell at full scale and at scale=proxy resolves and sets what its
name says (depth, norm, residual scheme, σReparam, optimizer and schedule), the proxy keeps the
conditions and swaps in its own numbers, and the table sweeps exactly its 32 cells in row order.

Expected values are written out here from the table's definition (recipes/mt_depth.md), not read back
from the configs.
"""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from sigma_repro.config import CONF_DIR, user_config_dirs

from .test_configs import resolve

DEPTHS = {"6L-6L": 6, "18L-18L": 18, "50L-50L": 50, "100L-100L": 100}
# cell -> (model.norm, model.scheme, reparam, reparam.gamma_init or None, optimizer)
SCHEMES = {
    "post_ln": ("post", "standard", "none", None, "adam"),
    "pre_ln": ("pre", "standard", "none", None, "adam"),
    "admin": ("post", "admin", "none", None, "adam"),
    "deepnorm": ("post", "deepnorm", "none", None, "adam"),
    "sigma_no_norm": ("none", "standard", "sigma", 1.0, "adam"),
    "sigma_post_ln": ("post", "standard", "sigma", "sigma", "adam"),
    "sgd_post_ln": ("post", "standard", "none", None, "sgd"),
    "sgd_sigma_post_ln": ("post", "standard", "sigma", "sigma", "sgd"),
}
CELLS = [f"mt_depth/{depth}/{scheme}" for depth in DEPTHS for scheme in SCHEMES]
# optimizer -> full scale (optim._target_, lr, schedule.decay, warmup_steps), proxy lr
FULL = {"adam": ("torch.optim.Adam", 1e-3, "inverse_sqrt", 8000), "sgd": ("torch.optim.SGD", 0.5, "cosine", 0)}
PROXY_LR = {"adam": 1e-3, "sgd": 0.1}

NEEDED = ["task/translation.yaml", "model/mt_base.yaml", "model/mt_tiny.yaml", "data/wmt.yaml", "data/gettext_de.yaml",
          "family_proxy/model/translation.yaml", "family_proxy/data/translation.yaml"]
MISSING = [n for n in NEEDED if not any((d / n).is_file() for d in [CONF_DIR, *user_config_dirs()])]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the translation family's configs are not there yet: {MISSING}")


def cell_config(cell: str, *scale: str) -> dict:
    return resolve(f"experiment={cell}", *(f"scale={s}" for s in scale), *(["data.root=/wmt"] if not scale else []))


@pytest.mark.parametrize("cell", CELLS)
def test_cell_sets_what_its_name_says_at_full_scale(cell):
    _, depth, scheme = cell.split("/")
    norm, residual, reparam, gamma_init, optimizer = SCHEMES[scheme]
    cfg = cell_config(cell)
    choices = cfg["hydra"]["runtime"]["choices"]
    assert (choices["task"], choices["model"], choices["data"], choices["optim"]) == \
        ("translation", "mt_base", "wmt", optimizer)
    model = cfg["model"]
    assert (model["dim"], model["depth"], model["encoder_depth"], model["decoder_depth"]) == (512, DEPTHS[depth], None, None)
    assert (model["norm"], model["scheme"], cfg["reparam"]["name"]) == (norm, residual, reparam)
    assert cfg["reparam"].get("gamma_init") == gamma_init
    assert (model["dropout"], model["attention_dropout"], model["activation_dropout"]) == (0.1, 0.1, 0.1)  # Admin
    target, lr, decay, warmup = FULL[optimizer]
    assert (cfg["optim"]["_target_"], cfg["optim"]["lr"], cfg["schedule"]["decay"], cfg["schedule"]["warmup_steps"]) == \
        (target, lr, decay, warmup)
    if optimizer == "adam":
        assert cfg["optim"]["betas"] == [0.9, 0.98] and cfg["optim"]["weight_decay"] == 0.0
    else:
        assert cfg["optim"]["momentum"] == 0.9 and cfg["optim"]["weight_decay"] == 0.0
    task = cfg["task"]
    assert (task["label_smoothing"], task["beam_size"], task["lenpen"], task["average_last"]) == (0.1, 4, 0.6, 10)
    assert (cfg["data"]["root"], cfg["trainer"]["gradient_clip_val"], cfg["trainer"]["precision"]) == \
        ("/wmt", None, "bf16-mixed")


@pytest.mark.parametrize("cell", CELLS)
def test_proxy_keeps_the_conditions_with_its_own_numbers(cell):
    _, depth, scheme = cell.split("/")
    norm, residual, reparam, gamma_init, optimizer = SCHEMES[scheme]
    cfg = cell_config(cell, "proxy")
    choices = cfg["hydra"]["runtime"]["choices"]
    assert (choices["task"], choices["model"], choices["data"], choices["optim"]) == \
        ("translation", "proxy", "proxy", optimizer)
    model = cfg["model"]
    assert (model["dim"], model["depth"]) == (64, DEPTHS[depth])  # mt_tiny at the cell's own depth
    assert (model["norm"], model["scheme"], cfg["reparam"]["name"], cfg["reparam"].get("gamma_init")) == \
        (norm, residual, reparam, gamma_init)
    # REFERENCE.md §6's CPU setting: constant lr, no warmup, 64 pairs, 600 steps, dropout on the branches only
    assert (cfg["optim"]["lr"], cfg["schedule"]["decay"], cfg["schedule"]["warmup_steps"]) == \
        (PROXY_LR[optimizer], "constant", 0)
    assert (cfg["data"]["batch_size"], cfg["trainer"]["max_steps"], cfg["trainer"]["precision"]) == (64, 600, "32-true")
    assert (model["dropout"], model["attention_dropout"], model["activation_dropout"]) == (0.1, 0.0, 0.0)
    assert (cfg["task"]["label_smoothing"], cfg["task"]["average_last"]) == (0.1, 0)


def test_table_sweeps_every_cell_depth_by_depth():
    sweep = resolve("table=mt_depth")["hydra"]["sweeper"]["params"]
    cells = OverridesParser.create().parse_override(f"experiment={sweep['experiment']}").sweep_string_iterator()
    assert list(cells) == CELLS
    assert sweep["seed"] == "0,1"
