"""Every config composes, every model/optimizer config instantiates, experiments are global packages."""


import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .conftest import CONF_DIR

GROUPS = ["task", "model", "data", "reparam", "optim", "schedule", "trainer", "logger", "callbacks"]


def options(group: str) -> list[str]:
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_train(f"{group}={option}")
    assert cfg.hydra.runtime.choices[group] == option
    OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_at_global_package(experiment):
    cfg = compose_train(f"experiment={experiment}")
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "experiment" not in cfg or cfg.get("experiment") is None  # merged at the root, not nested


@pytest.mark.parametrize("model", options("model"))
def test_model_configs_build_the_size_they_name(model):
    cfg = compose_train(f"model={model}")
    img = 8 if model == "vit_digits" else 32
    if model != "vit_digits":
        cfg.model.patch_size = 16
    net = hydra.utils.instantiate(cfg.model, img_size=img, in_chans=3, num_classes=10)
    dims = {"vit_digits": (64, 6), "vit_tiny": (192, 12), "vit_small": (384, 12), "vit_base": (768, 12),
            "vit_large": (1024, 24)}[model]
    assert (net.embed_dim, len(net.blocks)) == dims


def test_demo_experiments_differ_only_in_reparam():
    plain, sigma = (OmegaConf.to_container(compose_train(f"experiment=demo/{n}"), resolve=False) for n in ("plain", "sigma"))
    plain.pop("hydra"), sigma.pop("hydra")
    assert plain["reparam"]["name"] == "none" and sigma["reparam"]["name"] == "sigma"
    plain.pop("reparam"), sigma.pop("reparam")
    assert plain == sigma
