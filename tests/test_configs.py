"""Every config resolves, every model config instantiates, experiments are global packages, and
fragments cannot be selected.

Groups, options and cells are found by walking conf/: a config group is a directory of conf/ that
train.yaml's defaults list selects (hydra/launcher included); its options are the .yaml files under
it. Every option is composed and *resolved* (hydra node included), each experiment cell at every
scale. Directories the defaults list does not select (conf/fragments/, included by cells) must be
refused on the command line. conf/local/ holds a user's untracked profiles and is left alone.
"""

from contextlib import contextmanager

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import sigma_repro  # noqa: F401  (registers the resolvers the configs call)

from .conftest import CONF_DIR

PRIVATE = {"local"}  # conf/local/: untracked per-user profiles, merged where train.yaml and launchers say


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@contextmanager
def hydra_config(cfg):
    """Make `${hydra:...}` interpolations resolvable, as they are inside a run."""
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        HydraConfig.instance().cfg = None


def resolve(*overrides: str) -> dict:
    cfg = compose_train(*overrides)
    with hydra_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)


def options(group: str) -> list[str]:
    root = CONF_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def groups() -> list[str]:
    """The conf/ directories that train.yaml's defaults list selects as config groups."""
    choices = {key.split("@")[0] for key in compose_train().hydra.runtime.choices}
    return sorted(g for g in choices if (CONF_DIR / g).is_dir() and g not in PRIVATE)


GROUPS = groups()
FRAGMENT_DIRS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in PRIVATE
                       and not any(g == d.name or g.startswith(f"{d.name}/") for g in GROUPS))
SCALES = [None, *options("scale")]
COMPOSITIONS = (
    [(f"{g}={o}",) for g in GROUPS if g != "experiment" for o in options(g)]
    + [(f"experiment={cell}", *([f"scale={s}"] if s else [])) for cell in options("experiment") for s in SCALES]
)


def test_the_tree_walk_finds_the_groups_the_app_documents():
    assert {"task", "model", "data", "reparam", "optim", "experiment", "scale", "table", "hydra/launcher"} <= set(GROUPS)
    assert len(COMPOSITIONS) >= len(options("experiment")) * len(SCALES)


@pytest.mark.parametrize("overrides", COMPOSITIONS, ids=" ".join)
def test_every_option_and_cell_resolves(overrides):
    cfg = resolve(*overrides)
    for override in overrides:
        group, option = override.split("=", 1)
        assert cfg["hydra"]["runtime"]["choices"][group] == option


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_is_a_global_package(experiment):
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert compose_train(f"experiment={experiment}").get("experiment") is None  # merged at the root, not nested


@pytest.mark.parametrize("table", options("table"))
def test_every_table_sweeps_existing_cells(table):
    sweep = resolve(f"table={table}")["hydra"]["sweeper"]["params"]
    cells = OverridesParser.create().parse_override(f"experiment={sweep['experiment']}").sweep_string_iterator()
    missing = sorted(set(cells) - set(options("experiment")))
    assert not missing, f"conf/table/{table}.yaml sweeps cells that are not in conf/experiment/: {missing}"


@pytest.mark.parametrize("path", [f"{d}/{o}" for d in FRAGMENT_DIRS for o in options(d)])
def test_fragments_cannot_be_selected(path):
    group, option = path.rsplit("/", 1)  # as `sigma-repro-train --help` lists it
    with pytest.raises(ConfigCompositionException, match="No match in the defaults list"):
        compose_train(f"{group}={option}")


# Width and depth of the models the papers name.
MODEL_SIZES = {"vit_digits": (64, 6), "vit_tiny": (192, 12), "vit_small": (384, 12), "vit_base": (768, 12),
               "vit_large": (1024, 24)}


@pytest.mark.parametrize("model", sorted(MODEL_SIZES))
def test_model_configs_build_the_size_they_name(model):
    cfg = compose_train(f"model={model}")
    img = 8 if model == "vit_digits" else 32
    if model != "vit_digits":
        cfg.model.patch_size = 16
    net = hydra.utils.instantiate(cfg.model, img_size=img, in_chans=3, num_classes=10)
    assert (net.embed_dim, len(net.blocks)) == MODEL_SIZES[model]


def test_demo_experiments_differ_only_in_reparam():
    plain, sigma = (OmegaConf.to_container(compose_train(f"experiment=demo/{n}"), resolve=False) for n in ("plain", "sigma"))
    plain.pop("hydra"), sigma.pop("hydra")
    assert plain["reparam"]["name"] == "none" and sigma["reparam"]["name"] == "sigma"
    plain.pop("reparam"), sigma.pop("reparam")
    assert plain == sigma


def test_vit_norm_none_is_the_no_ln_model_of_the_committed_results():
    """model.norm=none builds timm's ViT with identity norms: the same parameters, the same random
    draws and the same function as the old way (build, then swap every norm layer for nn.Identity),
    so the committed no-LN proxy results stay reproducible; model.norm=post is refused."""
    import torch
    from torch import nn

    from sigma_repro.errors import ConfigError
    from sigma_repro.models.vit import build_vit

    shape = dict(img_size=8, in_chans=1, num_classes=10, patch_size=2, embed_dim=32, depth=2, num_heads=4)
    torch.manual_seed(0)
    old = build_vit(**shape)
    for module in list(old.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, name, nn.Identity())
    torch.manual_seed(0)
    new = build_vit(**shape, norm="none")
    assert not any(isinstance(m, nn.LayerNorm) for m in new.modules())
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(old(x), new(x))
    with pytest.raises(ConfigError, match="timm's ViT is pre-LN"):
        build_vit(**shape, norm="post")
