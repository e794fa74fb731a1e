"""The package as users install it: the wheel carries the code and conf/, `sigma-repro-train` runs a
job from an unrelated directory, and a user's own config dir joins through Hydra's search path.

The wheel is built from a copy of the checkout's pyproject.toml, README.md, sigma_repro/ and conf/.
The venv it goes into sees the test environment's site-packages (torch & co., through a .pth file)
but not the checkout, so `sigma_repro` and its configs can only come from the wheel. A fresh venv
with `pip install -c constraints.txt <wheel>` tests the same thing but takes minutes (it installs
the whole torch stack again).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import CONF_DIR, ROOT

pytestmark = pytest.mark.slow

# A 5-step run of the default ViT on digits, small enough to take seconds.
SHORT_RUN = ["trainer.max_steps=5", "trainer.max_epochs=-1", "logger=csv", "callbacks.diagnostics.every_n_steps=5",
             "trainer.enable_progress_bar=false", "model.depth=2", "model.embed_dim=32"]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("sigma_repro", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp / "dist", src])
    (built,) = (tmp / "dist").glob("sigma_repro-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel installed, layered on this environment's dependencies; its bin dir."""
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test_environment.pth").write_text("\n".join(sorted(deps)) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel])
    return root / "bin"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SIGMA_REPRO_RUNS")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sigma_repro").rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, (f"{missing} are not in the wheel: add their package to [tool.setuptools] packages "
                         f"in pyproject.toml")
    configs = {"sigma_repro/conf/" + p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")
               if p.relative_to(CONF_DIR).parts[0] != "local"}
    assert configs <= names, sorted(configs - names)
    assert not [n for n in names if n.startswith("sigma_repro/conf/local/")]  # cluster profiles stay private


def test_installed_app_runs_a_job_from_any_directory(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([venv / "python", "-c", "import sigma_repro, sigma_repro.config as c; print(sigma_repro.__file__); "
                 "print(c.CONF_DIR)"], cwd=elsewhere, env=clean_env()).stdout.split()
    package = Path(where[0]).parent
    assert package.is_relative_to(venv.parent) and not package.is_relative_to(ROOT)
    assert Path(where[1]) == package / "conf" and (package / "conf" / "train.yaml").is_file()

    run([venv / "sigma-repro-train", *SHORT_RUN, f"paths.runs_dir={tmp_path / 'runs'}"], cwd=elsewhere, env=clean_env())
    (summary_path,) = (tmp_path / "runs").rglob("summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and summary["steps"] == 5
    assert not list(elsewhere.iterdir())  # nothing written to the launch dir


def test_user_config_dir_on_the_search_path(venv, tmp_path):
    user_conf = tmp_path / "my_confs"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optim: sgd\n  - _self_\n\noptim:\n  lr: 0.0123\n")
    proc = run([venv / "sigma-repro-train", f"hydra.searchpath=[file://{user_conf}]", "experiment=mine",
                *SHORT_RUN, f"paths.runs_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=clean_env())
    (summary_path,) = (tmp_path / "runs").rglob("summary.json")
    assert summary_path.relative_to(tmp_path / "runs").parts[0] == "mine", proc.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and summary["steps"] == 5
    assert summary["config"]["optim"]["_target_"] == "torch.optim.SGD" and summary["config"]["optim"]["lr"] == 0.0123
