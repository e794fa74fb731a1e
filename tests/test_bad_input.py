"""Bad input: every case gets the app's own message (what was expected, what was found, what to do)
before any compute, with no traceback, no DONE.json and no checkpoint; nothing hangs.

Two layers. ``CONFIG_CASES`` run ``validate_config`` in-process on the composed config, one case
per kind of bad value (fast). ``RUN_CASES`` launch the real app as a subprocess for the cases whose
path to the user crosses Hydra, Lightning or loader workers, and for a sample of the config cases:
there the exit code, the printed message, the absence of a traceback and of DONE.json and
checkpoints are asserted end to end. Add a case to either list when a new kind of bad input turns up.
"""

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from sigma_repro.checks import check_runs_dir
from sigma_repro.errors import ConfigError
from sigma_repro.train import user_error, validate_config

from .conftest import ROOT
from .test_configs import compose_train
from .test_data import fake_cifar10, fake_image_folder, truncate_one_jpeg
from .test_train import FAST

# (id, overrides, fragments the message must contain)
CONFIG_CASES = [
    ("unknown optimizer argument", ["+optim.lrr=1"], ["optim.lrr is not an argument of torch.optim.AdamW",
                                                     "Did you mean optim.lr?"]),
    ("lr not a number", ["optim.lr=abc"], ["optim.lr must be a number > 0", "found 'abc'"]),
    ("negative lr", ["optim.lr=-1"], ["optim.lr must be a number > 0", "found -1"]),
    ("zero lr", ["optim.lr=0"], ["found 0 (a zero learning rate trains nothing)"]),
    ("negative weight decay", ["optim.weight_decay=-0.1"], ["optim.weight_decay must be a number >= 0"]),
    ("optimizer that does not import", ["optim._target_=torch.optim.Adamm"], ["optim._target_ must name"]),
    ("negative seed", ["seed=-1"], ["seed must be a whole number from 0 to 4294967295", "found -1"]),
    ("unknown precision", ["trainer.precision=fp8"], ["trainer.precision must be one of", "found 'fp8'",
                                                     "32-true"]),
    ("unknown accelerator", ["trainer.accelerator=gpuu"], ["trainer.accelerator must be auto, gpu or one of"]),
    ("cifar10 without root", ["data=cifar10"], ["data.root must be set", "data=cifar10", "data.root=<value>"]),
    ("zero batch size", ["data.batch_size=0"], ["data.batch_size must be a whole number from 1", "found 0"]),
    ("more CPU processes than cores", ["trainer.accelerator=cpu", f"trainer.devices={(os.cpu_count() or 1) + 1}"],
     ["trainer.devices on CPU", f"from 1 to {os.cpu_count()}", "Lower trainer.devices"]),
    ("zero devices", ["trainer.accelerator=cpu", "trainer.devices=0"], ["trainer.devices on CPU", "found 0"]),
]
if not torch.cuda.is_available():
    CONFIG_CASES.append(("gpu without one", ["trainer.accelerator=gpu"],
                         ["trainer.accelerator=gpu asks for a device this machine does not have",
                          "trainer.accelerator=cpu"]))


def validate(*overrides: str) -> None:
    """``validate_config`` on the app's config as a run sees it (``hydra:`` resolvable, no hydra node)."""
    cfg = compose_train(*FAST, *overrides)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        validate_config(cfg)
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_compute(overrides, fragments):
    with pytest.raises(ConfigError) as error:
        validate(*overrides)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_good_configs_pass_the_checks():
    validate()
    validate("optim=lars", "seed=4294967295", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu",
             "trainer.devices=1", "logger=default")


def test_online_wandb_without_credentials_says_log_in(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="wandb login.*WANDB_MODE=offline.*logger=csv"):
        validate("logger=default")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    validate("logger=default")  # what `wandb login` writes is enough


def test_sigma_options_under_reparam_none_reach_the_user_unwrapped():
    cfg = compose_train("+reparam.qkv=separate")
    with pytest.raises(hydra.errors.InstantiationException) as wrapped:
        hydra.utils.instantiate(cfg.reparam, _convert_="all")
    assert "reparam=none takes no σReparam options, found ['qkv']" in str(user_error(wrapped.value))


def refuses_read_only(runs: Path) -> bool:
    """Whether check_runs_dir refuses the read-only ``runs``, naming it and the OS's reason."""
    try:
        check_runs_dir(runs / "default" / "seed=0", "paths.runs_dir", runs)
    except ConfigError as error:
        return f"paths.runs_dir={runs} must be a writable directory" in str(error) and "Permission denied" in str(error)
    return False


def test_read_only_runs_dir_is_named():
    with tempfile.TemporaryDirectory() as parent:  # not under tmp_path: pytest's root dir is private to root
        Path(parent).chmod(0o755)
        runs = Path(parent) / "runs"
        runs.mkdir()
        runs.chmod(0o555)
        if os.geteuid() != 0:
            assert refuses_read_only(runs)
            return
        pid = os.fork()  # root writes into read-only dirs: the check runs in a child that drops to nobody
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                os._exit(0 if refuses_read_only(runs) else 1)
            finally:
                os._exit(2)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# -- end to end: the real app as a subprocess -----------------------------------------------------


def launch(runs: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The app on ``overrides`` as tests/test_train.py's ``train`` runs it, but with a short timeout:
    a case that regresses into launching processes or training must fail, not hang the suite."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sigma_repro.train", f"paths.runs_dir={runs}", *FAST, *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def crafted_cifar10(root: Path) -> list[str]:
    """A CIFAR-10 tree whose data_batch_1 runs ``touch <root>/pwned`` when unpickled with pickle.load."""
    fake_cifar10(root)

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {root / 'pwned'}",)

    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    return [f"data.root={root}", "data.num_workers=0"]


def truncated_jpeg_folder(root: Path) -> list[str]:
    """An ImageFolder tree (2 classes x 3 images per split) whose train/n01443537/n01443537_1.JPEG is cut short."""
    fake_image_folder(root)
    truncate_one_jpeg(root)
    # batches of 2 over 6 images: every image is trained on in the first epoch
    return [f"data.root={root}", "data.image_size=32", "data.batch_size=2", "data.num_workers=0",
            "callbacks.diagnostics.probe_size=4"]


def runs_dir_file(tmp_path: Path) -> Path:
    (tmp_path / "runs").write_text("a file, not a directory")
    return tmp_path / "runs"


def runs_dir_read_only(tmp_path: Path) -> Path:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs").chmod(0o555)
    return tmp_path / "runs"


# (id, runs dir from tmp_path, overrides from tmp_path, extra environment, fragments the output must contain)
RUN_CASES = [
    ("unknown optimizer argument", None, lambda t: ["+optim.lrr=1"], None,
     ["optim.lrr is not an argument of torch.optim.AdamW"]),
    ("99 devices on CPU", None, lambda t: ["trainer.accelerator=cpu", "trainer.devices=99"], None,
     ["trainer.devices on CPU", "found 99"]),
    ("sigma options under reparam=none", None, lambda t: ["+reparam.qkv=separate"], None,
     ["reparam=none takes no σReparam options, found ['qkv']"]),
    ("online wandb without credentials", None, lambda t: ["logger=default"],
     lambda t: {"WANDB_MODE": "online", "HOME": str(t), "WANDB_API_KEY": "", "NETRC": str(t / "none")},
     ["wandb login", "WANDB_MODE=offline"]),
    ("runs dir is a file", runs_dir_file, lambda t: [], None,
     ["must be a writable directory", "is a file, not a directory"]),
    ("runs dir on /proc", lambda t: Path("/proc/sigma-repro-runs"), lambda t: [], None,
     ["paths.runs_dir=/proc/sigma-repro-runs must be a writable directory"]),
    pytest.param("runs dir read-only", runs_dir_read_only, lambda t: [], None,
                 ["must be a writable directory", "Permission denied"],
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only dirs")),
    ("crafted cifar10 pickle", None, lambda t: ["data=cifar10", *crafted_cifar10(t / "cifar")], None,
     ["data_batch_1 is not a CIFAR-10 batch", "it asks to call posix.system"]),
    ("truncated jpeg in an ImageFolder", None, lambda t: ["data=imagenet", *truncated_jpeg_folder(t / "imnet")],
     None, ["Cannot read image file", "n01443537_1.JPEG", "data.skip_corrupt=true"]),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name, runs_dir, overrides, env, fragments", RUN_CASES, ids=map(_case_id, RUN_CASES))
def test_bad_input_run_ends_with_its_message_and_no_traceback(tmp_path, name, runs_dir, overrides, env, fragments):
    runs = runs_dir(tmp_path) if runs_dir else tmp_path / "runs"
    proc = launch(runs, *overrides(tmp_path), env=env(tmp_path) if env else None)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    for fragment in fragments:
        assert fragment in output, output[-3000:]
    assert "Traceback" not in output and "Error executing job" not in output, output[-3000:]
    assert not list(tmp_path.rglob("DONE.json")) and not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path / "cifar" / "pwned").exists()
