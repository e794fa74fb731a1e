"""Sweeps: one identity per run however the sweep spells a value (config.job_dir_name), and a
multirun that tallies its cells and exits non-zero when any did not end (sweeps.SweepTally).
The multirun through the app, failing cells and all, is in test_train.py."""

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from sigma_repro.config import job_dir_name
from sigma_repro.sweeps import SweepTally


def sweep_spelling(*overrides: str) -> list[str]:
    """The overrides of a sweep's first job, as Hydra's basic sweeper writes them for the job dir."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return BasicSweeper.split_arguments(parsed, None)[0][0]


def test_booleans_and_null_give_one_dir_however_a_sweep_spells_them():
    swept = sweep_spelling("model.norm=none", "trainer.deterministic=true,false", "x=NULL,1", "y=None")
    assert swept == ["model.norm=none", "trainer.deterministic=True", "x=null", "y=None"]  # Hydra's spellings
    typed = "model.norm=none,trainer.deterministic=true,x=NULL,y=None"
    assert job_dir_name("e", ",".join(swept), 0) == job_dir_name("e", typed, 0) == \
        "e/model.norm=none,trainer.deterministic=true,x=null,y=None/seed=0"  # "none" is a name, "None" a string
    assert job_dir_name("e", "a=FALSE,true=1,b=truex", 0) == "e/a=false,true=1,b=truex/seed=0"


def job_return(num: int, status: JobStatus, value) -> JobReturn:
    hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": num}, "runtime": {"output_dir": f"/runs/cell{num}"}}})
    return JobReturn(hydra_cfg=hydra_cfg, status=status, _return_value=value)


def tallied(tmp_path, *returns: JobReturn):
    tally = SweepTally()
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    tally.on_multirun_start(sweep)
    for r in returns:
        tally.on_job_end(OmegaConf.create(), r)
    tally.on_multirun_end(sweep)


def test_a_sweep_whose_cells_all_ended_exits_zero_with_its_tally(tmp_path, capsys):
    tallied(tmp_path, job_return(0, JobStatus.COMPLETED, {"status": "finished"}),
            job_return(1, JobStatus.COMPLETED, {"status": "diverged"}))
    assert capsys.readouterr().out == "sigma-repro: sweep of 2 cells: 1 finished, 1 diverged, 0 failed, 0 interrupted\n"
    assert not list((tmp_path / ".multirun").iterdir())  # the tally dir is removed


def test_a_sweep_with_failed_or_interrupted_cells_exits_one_naming_their_dirs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        tallied(tmp_path, job_return(0, JobStatus.COMPLETED, {"status": "failed"}),
                job_return(1, JobStatus.COMPLETED, {"status": "finished"}),
                job_return(2, JobStatus.FAILED, RuntimeError("raised out of the app")),
                job_return(3, JobStatus.COMPLETED, {"status": "interrupted"}))
    assert exit_.value.code == 1
    assert capsys.readouterr().out.startswith(
        "sigma-repro: sweep of 4 cells: 1 finished, 0 diverged, 2 failed, 1 interrupted; "
        "failed: /runs/cell0, /runs/cell2; interrupted: /runs/cell3 (the same command retries")

