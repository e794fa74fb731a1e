"""The asr table composes: every cell at full scale and at scale=proxy resolves and sets what its name
says (model, norm, σReparam and its γ init, optimizer, warmup, the front end's subsampling), the proxy
keeps the conditions with its own numbers (the Conformer cells too: conformer_tiny, not the family's
proxy speech transformer), and the table sweeps exactly its 12 cells.

Expected values are written out here from the table's definition (recipes/asr.md), not read back from
the configs.
"""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from sigma_repro.results import CONDITIONS

from .test_configs import resolve

TRANSFORMER, CONFORMER = "sigma_repro.models.speech.SpeechTransformer", "sigma_repro.models.speech.ConformerCTC"
# variant -> (model class, model.norm or None (the Conformer has its own), reparam, gamma_init or None)
VARIANTS = {
    "post_ln": (TRANSFORMER, "post", "none", None),
    "pre_ln": (TRANSFORMER, "pre", "none", None),
    "sigma": (TRANSFORMER, "none", "sigma", 1.0),
    "sigma_post_ln": (TRANSFORMER, "post", "sigma", 1.0),
    "conformer": (CONFORMER, None, "none", None),
    "conformer_sigma": (CONFORMER, None, "sigma", 1.0),
}
OPTIMIZERS = ("adam", "sgd")
CELLS = [f"asr/{optimizer}/{variant}" for optimizer in OPTIMIZERS for variant in VARIANTS]
# optimizer -> (optim._target_, full lr, full warmup steps, proxy lr, proxy warmup steps)
OPTIM = {"adam": ("torch.optim.Adam", 1e-3, 32000, PROXY_ADAM_LR := 2e-3, PROXY_ADAM_WARMUP := 50),
         "sgd": ("torch.optim.SGD", 0.5, 0, PROXY_SGD_LR := 0.1, 0)}
PROXY_STEPS, PROXY_BATCH = 500, 32
# model class -> (full: width, depth, subsampling), (proxy: width, depth, subsampling)
SIZES = {TRANSFORMER: ((768, 36, 3), (128, 6, 3)), CONFORMER: ((144, 16, 4), (96, 4, 4))}


def cell_config(cell: str, *scale: str) -> dict:
    return resolve(f"experiment={cell}", *(f"scale={s}" for s in scale), *(["data.root=/ls"] if not scale else []))


def _check_conditions(cfg: dict, cell: str, proxy: bool) -> None:
    _, optimizer, variant = cell.split("/")
    target, norm, reparam, gamma_init = VARIANTS[variant]
    model = cfg["model"]
    assert model["_target_"] == target
    assert model.get("norm") == norm
    assert (cfg["reparam"]["name"], cfg["reparam"].get("gamma_init")) == (reparam, gamma_init)
    dim, depth, subsampling = SIZES[target][proxy]
    assert (model["dim"], model["depth"], cfg["data"]["subsampling"]) == (dim, depth, subsampling)
    if target == TRANSFORMER:
        assert model["stride"] == subsampling
    optim_target, lr, warmup, proxy_lr, proxy_warmup = OPTIM[optimizer]
    assert cfg["optim"]["_target_"] == optim_target
    assert (cfg["optim"]["lr"], cfg["schedule"]["warmup_steps"]) == ((proxy_lr, proxy_warmup) if proxy else (lr, warmup))
    assert cfg["trainer"]["gradient_clip_val"] is None  # no clipping in any cell


@pytest.mark.parametrize("cell", CELLS)
def test_cell_sets_what_its_name_says_at_full_scale(cell):
    cfg = cell_config(cell)
    choices = cfg["hydra"]["runtime"]["choices"]
    assert (choices["task"], choices["data"]) == ("asr", "librispeech")
    _check_conditions(cfg, cell, proxy=False)
    assert (cfg["data"]["train"], cfg["data"]["val"], cfg["data"]["test"]) == (["train-clean-100"], "dev-clean", "test-clean")
    assert (cfg["data"]["root"], cfg["trainer"]["precision"]) == ("/ls", "bf16-mixed")


@pytest.mark.parametrize("cell", CELLS)
def test_proxy_keeps_the_conditions_with_its_own_numbers(cell):
    cfg = cell_config(cell, "proxy")
    choices = cfg["hydra"]["runtime"]["choices"]
    assert (choices["task"], choices["model"], choices["data"]) == ("asr", "proxy", "proxy")
    assert cfg["data"]["_target_"] == "sigma_repro.data.speech.EspeakSpeechDataModule"
    _check_conditions(cfg, cell, proxy=True)
    assert (cfg["data"]["batch_size"], cfg["trainer"]["max_steps"], cfg["trainer"]["precision"]) == \
        (PROXY_BATCH, PROXY_STEPS, "32-true")
    assert (cfg["data"]["utterances_per_epoch"], cfg["data"]["val_utterances"]) == (None, None)
    assert not {"root", "train", "val", "test"} & set(cfg["data"])  # LibriSpeech's keys do not reach the espeak data


def test_table_sweeps_every_cell_and_reports_wer_with_the_model_class():
    table = resolve("table=asr")
    sweep = table["hydra"]["sweeper"]["params"]
    cells = OverridesParser.create().parse_override(f"experiment={sweep['experiment']}").sweep_string_iterator()
    assert list(cells) == CELLS
    assert sweep["seed"] == "0,1"
    report = table["report"]
    assert report["metrics"][0] == {"name": "val/wer", "higher_is_better": False}
    assert set(report["columns"]) <= set(CONDITIONS) and "arch" in report["columns"]


def test_arch_condition_names_the_model_class_at_any_scale():
    class Run:  # the two fields CONDITIONS["arch"] reads
        summary = {"choices": {"model": "proxy"}}
        config = {"model": {"_target_": CONFORMER}}
    assert CONDITIONS["arch"](Run) == "ConformerCTC"
    Run.config = {"model": {}}
    assert CONDITIONS["arch"](Run) is None


def test_every_proxy_cell_builds_its_data_model_and_reparam_on_the_tiny_corpus(tmp_path_factory, monkeypatch):
    """What a proxy cell instantiates (data with the cell's keys, the model with the data's kwargs, the
    reparam converter) builds and runs one forward: no key of the full scale leaks into the proxy."""
    import hydra.utils
    import torch

    from .speech_fixtures import TINY_ESPEAK, tiny_espeak_cache

    monkeypatch.setenv("SIGMA_REPRO_DATA", str(tiny_espeak_cache(tmp_path_factory)))
    data = {}
    for cell in CELLS:
        cfg = cell_config(cell, "proxy")
        key = tuple(sorted((k, str(v)) for k, v in cfg["data"].items()))
        if key not in data:  # the transformer and the Conformer cells differ in data.subsampling only
            data[key] = hydra.utils.instantiate({**cfg["data"], **TINY_ESPEAK, "batch_size": 4}, seed=0)
        dm = data[key]
        model = hydra.utils.instantiate(cfg["model"], **dm.model_kwargs)
        model = hydra.utils.instantiate(cfg["reparam"]).convert(model)
        batch = dm.probe_batch(2)
        logits, lengths = model.eval()(batch["features"], batch["feature_lengths"])
        assert logits.shape[-1] == 29 and torch.equal(lengths, model.output_lengths(batch["feature_lengths"]))
    assert len(data) == 2
