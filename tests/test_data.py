"""Image DataModules: layouts, shapes, normalisation, errors; and exact resume under a real Lightning Trainer.

Fashion-MNIST, CIFAR-10 and ImageNet are tested on tiny fake trees written to tmp_path in their
real on-disk formats; digits is the real bundled set, checked against scikit-learn directly.
"""

import gzip
import os
import pickle
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader

from sigma_repro.data import CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule, ImageNetDataModule
from sigma_repro.data.sampling import ResumableSampler
from sigma_repro.errors import ConfigError

from .helpers import assert_loader_resumes_mid_epoch


def epoch_labels(dm, epoch: int) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [labels for _, labels in loader]


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_and_normalisation_match_sklearn():
    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(1797), test_size=360, stratify=digits.target, random_state=0)
    pixels = digits.images / 16.0
    mean, std = pixels[train_idx].mean(), pixels[train_idx].std()

    dm = DigitsDataModule(batch_size=32)

    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 8, 1)
    assert (len(dm.train_set), len(dm.val_set)) == (1437, 360)
    for dataset, indices in ((dm.train_set, train_idx), (dm.val_set, val_idx)):
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        expected = torch.from_numpy((pixels[indices] - mean) / std).float().unsqueeze(1)
        torch.testing.assert_close(torch.stack(images), expected, rtol=0, atol=1e-5)
        assert list(labels) == digits.target[indices].tolist()
    # stratified: every class's share of val is its share of the whole set, to within one image
    val_counts = np.bincount(digits.target[val_idx], minlength=10)
    assert np.all(np.abs(val_counts - np.bincount(digits.target) * 360 / 1797) <= 1)


def test_digits_val_set_and_probe_batch_are_fixed_across_seeds():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    assert torch.equal(a.val_set.images, b.val_set.images)
    probe_a, probe_b = a.probe_batch(50), b.probe_batch(50)
    assert probe_a[0].shape == (50, 1, 8, 8) and probe_a[1].dtype == torch.int64
    assert all(torch.equal(x, y) for x, y in zip(probe_a, probe_b))
    assert len(set(probe_a[1].tolist())) == 10  # spread over the set, not the first 50


def test_digits_training_order_is_a_function_of_seed_and_epoch():
    dm0, dm0_again, dm1 = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    order = torch.cat(epoch_labels(dm0, 0))
    assert len(order) == 1437 // 64 * 64  # drop_last
    assert torch.equal(order, torch.cat(epoch_labels(dm0_again, 0)))
    assert not torch.equal(order, torch.cat(epoch_labels(dm1, 0)))
    assert not torch.equal(order, torch.cat(epoch_labels(dm0, 1)))


def test_loading_never_moves_the_global_rngs():
    dm = DigitsDataModule()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    list(dm.train_dataloader())
    list(dm.val_dataloader())
    assert torch.equal(states[0], torch.get_rng_state())
    assert states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        DigitsDataModule(batch_size=2000)
    with pytest.raises(ConfigError, match="probe"):
        DigitsDataModule().probe_batch(361)
    dm = DigitsDataModule(batch_size=64)
    dm.trainer = SimpleNamespace(world_size=32, global_rank=0)  # 1437 images / 32 devices = 44 each
    with pytest.raises(ConfigError, match="per-device"):
        dm.train_dataloader()


# --- sampler and loader ------------------------------------------------------------------------


def test_sampler_shards_cover_the_permutation_once():
    shards = [ResumableSampler(103, seed=5, num_replicas=4, rank=r) for r in range(4)]
    keys = [s.epoch_keys() for s in shards]
    assert all(len(k) == len(s) == 25 for k, s in zip(keys, shards))
    indices = [i for k in keys for i, _ in k]
    assert len(set(indices)) == 100 and set(indices) <= set(range(103))


def test_sampler_start_leaves_out_the_first_keys():
    sampler = ResumableSampler(20, seed=0)
    sampler.set_epoch(3)
    sampler.start = 8
    assert list(sampler) == sampler.epoch_keys()[8:]
    assert len(sampler) == 20  # the epoch's length, which Lightning counts batches against


def test_loader_state_resumes_at_the_next_batch_of_its_epoch_only():
    dm = DigitsDataModule(batch_size=100)
    uninterrupted = assert_loader_resumes_mid_epoch(dm.train_dataloader, epoch=2, after=5, key=lambda b: b[1])
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, epoch_labels(dm, 2)))
    state = {"epoch": 2, "batches_done": 5}

    moved_on = dm.train_dataloader()
    moved_on.load_state_dict(state)
    moved_on.sampler.set_epoch(3)  # the run had gone on to epoch 3: it starts at its beginning
    assert all(torch.equal(a, b) for a, b in zip([y for _, y in moved_on], epoch_labels(dm, 3), strict=True))


# --- Fashion-MNIST -----------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    else:
        path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory: Path, *, gz: bool, n_train: int = 40, n_val: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_val) * 3) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(directory / name, array, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_fashion_mnist_reads_both_layouts(tmp_path, layout, gz):
    directory = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = fake_fashion_mnist(directory, gz=gz)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=8)

    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 28, 1)
    assert (len(dm.train_set), len(dm.val_set)) == (40, 12)
    train_pixels = arrays["train-images-idx3-ubyte"] / 255.0
    image, label = dm.val_set[5]
    expected = (arrays["t10k-images-idx3-ubyte"][5] / 255.0 - train_pixels.mean()) / train_pixels.std()
    assert image.shape == (1, 28, 28)
    torch.testing.assert_close(image[0], torch.from_numpy(expected).float(), rtol=0, atol=1e-5)
    assert label == arrays["t10k-labels-idx1-ubyte"][5]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 28, 28) and labels.shape == (8,)


def test_fashion_mnist_limit_train_is_a_fixed_subset(tmp_path):
    fake_fashion_mnist(tmp_path, gz=True)
    a = FashionMNISTDataModule(root=str(tmp_path), batch_size=4, limit_train=10, seed=0)
    b = FashionMNISTDataModule(root=str(tmp_path), batch_size=4, limit_train=10, seed=7)
    full = FashionMNISTDataModule(root=str(tmp_path), batch_size=4)
    assert len(a.train_set) == 10
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert len({tuple(img.flatten().tolist()) for img in a.train_set.images}) == 10
    assert torch.equal(a.train_set.transform.mean, full.train_set.transform.mean)
    with pytest.raises(ConfigError, match="limit_train"):
        FashionMNISTDataModule(root=str(tmp_path), batch_size=4, limit_train=41)


def test_fashion_mnist_missing_files_error_names_path_files_and_package(tmp_path):
    fake_fashion_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError) as error:
        FashionMNISTDataModule(root=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and "/usr/share/datasets/fashion-mnist" in message
    with pytest.raises(ConfigError, match="no such directory"):
        FashionMNISTDataModule(root=str(tmp_path / "absent"))


@pytest.mark.parametrize("damage", ["truncated", "wrong_magic", "not_gzip"])
def test_fashion_mnist_malformed_file_error_names_it(tmp_path, damage):
    fake_fashion_mnist(tmp_path, gz=damage == "not_gzip")
    name = "train-images-idx3-ubyte" + (".gz" if damage == "not_gzip" else "")
    path = tmp_path / name
    raw = path.read_bytes()
    damaged = {"truncated": raw[:-5], "wrong_magic": b"\x00\x00\x09\x03" + raw[4:], "not_gzip": raw[10:]}
    path.write_bytes(damaged[damage])
    with pytest.raises(ConfigError, match=name):
        FashionMNISTDataModule(root=str(tmp_path))


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)
def test_fashion_mnist_debian_package_is_the_full_set():
    dm = FashionMNISTDataModule()
    assert (len(dm.train_set), len(dm.val_set)) == (60_000, 10_000)
    assert torch.bincount(dm.train_set.labels).tolist() == [6000] * 10
    assert torch.bincount(dm.val_set.labels).tolist() == [1000] * 10
    torch.testing.assert_close(dm.train_set.transform.mean.flatten(), torch.tensor([0.2860]), atol=1e-4, rtol=0)


# --- CIFAR-10 ----------------------------------------------------------------------------------


def fake_cifar10(root: Path, per_batch: int = 8) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [(i + j) % 10 for j in range(per_batch)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batches[name], f)
    return batches


def test_cifar10_reads_pickles_in_order_with_rgb_planes(tmp_path):
    batches = fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=8, num_workers=0, augment=False)

    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 32, 3)
    assert (len(dm.train_set), len(dm.val_set)) == (40, 8)
    train_data = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)]) / 255.0
    planes = train_data.reshape(40, 3, 1024)
    mean, std = planes.mean(axis=(0, 2)), planes.std(axis=(0, 2))
    image, label = dm.train_set[13]  # data_batch_2, row 5
    assert label == batches["data_batch_2"][b"labels"][5]
    green = batches["data_batch_2"][b"data"][5][1024:2048].reshape(32, 32) / 255.0
    torch.testing.assert_close(image[1], torch.from_numpy((green - mean[1]) / std[1]).float(), rtol=0, atol=1e-5)
    assert dm.val_set[3][1] == batches["test_batch"][b"labels"][3]


def test_cifar10_augmentation_is_seeded_and_independent_of_workers(tmp_path):
    fake_cifar10(tmp_path)
    plain = CIFAR10DataModule(root=str(tmp_path), batch_size=8, num_workers=0, augment=False)
    augmented = [CIFAR10DataModule(root=str(tmp_path), batch_size=8, num_workers=w, seed=3) for w in (0, 0, 2)]
    epochs = [[images for images, _ in dm.train_dataloader()] for dm in augmented]
    assert len(epochs[0]) == 5
    for other in epochs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(epochs[0], other))
    # each augmented image is its original, zero-padded by 4, cropped back to 32x32 and maybe flipped
    normalize = augmented[0].train_set.transform.transforms[-1]
    keys = augmented[0].train_dataloader().sampler.epoch_keys()[:8]
    for (index, _), image in zip(keys, epochs[0][0]):
        raw = ((image * normalize.std + normalize.mean) * 255).round()
        padded = nn.functional.pad(plain.train_set.images[index].float(), (4, 4, 4, 4))
        crops = [padded[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(raw, c) or torch.equal(raw, c.flip(-1)) for c in crops)
    assert not all(torch.equal(a, b) for a, b in zip(epochs[0][0], [plain.train_set[i][0] for i, _ in keys]))


def test_cifar10_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError) as error:
        CIFAR10DataModule(root=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message and "test_batch" in message
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="test_batch"):
        CIFAR10DataModule(root=str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ConfigError, match=r"\(N, 3072\) uint8"):
        CIFAR10DataModule(root=str(tmp_path))


def test_cifar10_pickles_are_read_without_running_code(tmp_path):
    batches = fake_cifar10(tmp_path)
    directory = tmp_path / "cifar-10-batches-py"
    # the real files are Python 2 pickles (protocol 2): numpy's array reconstruction, nothing else
    with open(directory / "data_batch_3", "wb") as f:
        pickle.dump(batches["data_batch_3"], f, protocol=2)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=8, num_workers=0, augment=False)
    assert dm.train_set.labels[16:24].tolist() == batches["data_batch_3"][b"labels"]

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    with open(directory / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, f)
    with pytest.raises(ConfigError) as error:
        CIFAR10DataModule(root=str(tmp_path))
    assert str(directory / "data_batch_2") in str(error.value) and "posix.system" in str(error.value)
    assert not (tmp_path / "pwned").exists()


# --- ImageNet (ImageFolder) --------------------------------------------------------------------


def fake_image_folder(root: Path, classes=("n01440764", "n01443537"), per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (40 + 4 * k, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{k}.JPEG")


def test_imagenet_folder_shapes_labels_and_seeded_augmentation(tmp_path):
    fake_image_folder(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=4, num_workers=0, image_size=32)

    assert (dm.num_classes, dm.image_size, dm.channels) == (2, 32, 3)
    assert (len(dm.train_set), len(dm.val_set)) == (6, 6)
    assert [label for _, label in dm.val_set] == [0, 0, 0, 1, 1, 1]
    images, labels = dm.probe_batch(6)
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(images, dm.probe_batch(6)[0])  # eval transform: deterministic
    train = dm.train_dataloader()
    batch = next(iter(train))
    assert batch[0].shape == (4, 3, 32, 32)
    assert torch.equal(batch[0], next(iter(dm.train_dataloader()))[0])  # RandAugment etc. seeded per batch
    assert len(train) == 1  # drop_last


def test_imagenet_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="root/train/<class>"):
        ImageNetDataModule(root=str(tmp_path / "absent"))
    fake_image_folder(tmp_path)
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(ConfigError, match="only in val \\['n99999999'\\]"):
        ImageNetDataModule(root=str(tmp_path))
    (tmp_path / "train" / "n99999999").mkdir()
    with pytest.raises(ConfigError, match="n99999999"):  # a class folder without images
        ImageNetDataModule(root=str(tmp_path))


def truncate_one_jpeg(root: Path) -> Path:
    bad = root / "train" / "n01443537" / "n01443537_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    return bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagenet_unreadable_file_is_named_before_its_batch_trains(tmp_path, num_workers):
    fake_image_folder(tmp_path)
    bad = truncate_one_jpeg(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, num_workers=num_workers, image_size=32)
    with pytest.raises(ConfigError) as error:
        for batch in dm.train_dataloader():  # batches of 2 over 6 images: every image is read
            dm.on_before_batch_transfer(batch, 0)
    assert f"Cannot read image file {bad}: OSError" in str(error.value)
    assert "data.skip_corrupt=true" in str(error.value)


def test_imagenet_skip_corrupt_replaces_and_counts_unreadable_files(tmp_path):
    fake_image_folder(tmp_path)
    bad = truncate_one_jpeg(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, num_workers=2, image_size=32, skip_corrupt=True)
    with pytest.warns(UserWarning, match="1 unreadable image file"):
        labels = torch.cat([dm.on_before_batch_transfer(batch, 0)[1] for batch in dm.train_dataloader()])
    assert dm.unreadable_files == [str(bad)]  # marked in a loader worker, seen here
    # the unreadable n01443537_1 (label 1) was replaced by the next file, n01443537_2 (label 1)
    assert labels.tolist().count(1) == 3 and len(labels) == 6


# --- exact resume under a real Trainer ---------------------------------------------------------

STEPS_PER_EPOCH = 1437 // 64  # 22


class TinyClassifier(pl.LightningModule):
    """A dropout-free MLP on digits: its training depends on nothing random but the data order."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.seen_labels: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen_labels.append(labels.clone())
        return nn.functional.cross_entropy(self.net(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Crash(Exception):
    pass


class CrashAtStep(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated kill at step {self.step}")


def fit(length: dict, datamodule, *, callbacks=(), ckpt_path=None, root: Path) -> TinyClassifier:
    torch.manual_seed(0)  # the same initial weights in every run; the module itself never reseeds
    model = TinyClassifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        **length,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        default_root_dir=root,
    )
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        finally:
            model.warnings = [str(w.message) for w in caught]
            torch.use_deterministic_algorithms(deterministic_before)  # the Trainer set it process-wide
    return model


UNINTERRUPTED: dict[str, TinyClassifier] = {}


def uninterrupted(length_name: str, tmp_path_factory) -> TinyClassifier:
    if length_name not in UNINTERRUPTED:
        UNINTERRUPTED[length_name] = fit(
            LENGTHS[length_name], DigitsDataModule(seed=1), root=tmp_path_factory.mktemp("uninterrupted")
        )
    return UNINTERRUPTED[length_name]


LENGTHS = {"max_steps": {"max_steps": 2 * STEPS_PER_EPOCH + 11}, "max_epochs": {"max_epochs": 3}}
EVERY_11_STEPS = {"every_n_train_steps": 11}
AT_TRAIN_EPOCH_END = {"every_n_epochs": 1}
AFTER_VALIDATION = {"every_n_epochs": 1, "save_on_train_epoch_end": False}
MID_EPOCH_1 = {"epoch": 1, "batches_done": 11}
END_OF_EPOCH_0 = {"epoch": 0, "batches_done": 22}
RESUME_CASES = {
    # name: (training length, ModelCheckpoint args, killed before step, last.ckpt's step, its loader state)
    # checkpoint every 11 steps, killed at step 35: resumes at step 33, batch 11 of epoch 1
    "mid_epoch": ("max_steps", EVERY_11_STEPS, 35, 33, MID_EPOCH_1),
    "mid_epoch_max_epochs": ("max_epochs", EVERY_11_STEPS, 35, 33, MID_EPOCH_1),
    # killed at step 24: resumes at step 22, from a checkpoint saved after epoch 0's last batch ...
    "last_batch_of_epoch": ("max_steps", EVERY_11_STEPS, 24, 22, END_OF_EPOCH_0),
    # ... saved at the end of epoch 0 (on_train_epoch_end, or after validation)
    "train_epoch_end": ("max_steps", AT_TRAIN_EPOCH_END, 24, 22, END_OF_EPOCH_0),
    "train_epoch_end_max_epochs": ("max_epochs", AT_TRAIN_EPOCH_END, 24, 22, END_OF_EPOCH_0),
    "validation_end": ("max_steps", AFTER_VALIDATION, 24, 22, END_OF_EPOCH_0),
    "validation_end_max_epochs": ("max_epochs", AFTER_VALIDATION, 24, 22, END_OF_EPOCH_0),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_from_last_ckpt_is_bitwise_exact(case, tmp_path, tmp_path_factory):
    length, checkpoint_args, crash_step, resume_step, loader_state = RESUME_CASES[case]
    reference = uninterrupted(length, tmp_path_factory)

    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, enable_version_counter=False, **checkpoint_args
    )
    killed = [checkpoint, CrashAtStep(crash_step)]
    with pytest.raises(Crash):
        fit(LENGTHS[length], DigitsDataModule(seed=1), callbacks=killed, root=tmp_path)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == resume_step
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [loader_state]

    resumed = fit(LENGTHS[length], DigitsDataModule(seed=1), ckpt_path=str(last), root=tmp_path)

    assert not [w for w in resumed.warnings if "not resumable" in w]
    batches_after_resume = zip(resumed.seen_labels, reference.seen_labels[resume_step:], strict=True)
    assert all(torch.equal(a, b) for a, b in batches_after_resume)
    for (name, p_resumed), p_reference in zip(resumed.named_parameters(), reference.parameters()):
        assert torch.equal(p_resumed, p_reference), name


def test_resume_twice_first_from_an_epoch_end_checkpoint(tmp_path, tmp_path_factory):
    """After a resume from an on_train_epoch_end checkpoint Lightning's set_epoch value runs one
    ahead of trainer.current_epoch; a later mid-epoch resume must still be exact."""
    reference = uninterrupted("max_steps", tmp_path_factory)
    epoch_end = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "a", save_last=True, **AT_TRAIN_EPOCH_END)
    with pytest.raises(Crash):
        fit(LENGTHS["max_steps"], DigitsDataModule(seed=1), callbacks=[epoch_end, CrashAtStep(24)], root=tmp_path)
    every_11 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, **EVERY_11_STEPS)
    with pytest.raises(Crash):
        fit(
            LENGTHS["max_steps"],
            DigitsDataModule(seed=1),
            callbacks=[every_11, CrashAtStep(35)],
            ckpt_path=str(tmp_path / "a" / "last.ckpt"),
            root=tmp_path,
        )
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2  # Lightning's set_epoch value
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [MID_EPOCH_1]

    resumed = fit(
        LENGTHS["max_steps"], DigitsDataModule(seed=1), ckpt_path=str(tmp_path / "b" / "last.ckpt"), root=tmp_path
    )

    assert all(torch.equal(a, b) for a, b in zip(resumed.seen_labels, reference.seen_labels[33:], strict=True))
    for p_resumed, p_reference in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p_resumed, p_reference)


def test_resume_with_loader_workers_matches_the_run_without(tmp_path, tmp_path_factory):
    """Two worker processes fetch indices ahead and start before Lightning's set_epoch: neither may
    change the batches, nor where a mid-epoch resume picks up."""
    reference = uninterrupted("max_steps", tmp_path_factory)  # num_workers=0
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, **EVERY_11_STEPS)
    with pytest.raises(Crash):
        fit(
            LENGTHS["max_steps"],
            DigitsDataModule(seed=1, num_workers=2),
            callbacks=[checkpoint, CrashAtStep(35)],
            root=tmp_path,
        )
    resumed = fit(
        LENGTHS["max_steps"],
        DigitsDataModule(seed=1, num_workers=2),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        root=tmp_path,
    )
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen_labels, reference.seen_labels[33:], strict=True))
    for p_resumed, p_reference in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(p_resumed, p_reference)


class PlainLoaderDigits(DigitsDataModule):
    """Control: an ordinary shuffled DataLoader, which Lightning cannot resume mid-epoch."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_resume_check_detects_a_non_resumable_loader(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, **EVERY_11_STEPS)
    length = {"max_steps": 40}
    reference = fit(length, PlainLoaderDigits(seed=1), root=tmp_path)
    with pytest.raises(Crash):
        fit(length, PlainLoaderDigits(seed=1), callbacks=[checkpoint, CrashAtStep(35)], root=tmp_path)
    resumed = fit(length, PlainLoaderDigits(seed=1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), root=tmp_path)
    assert [w for w in resumed.warnings if "not resumable" in w]
    assert not all(torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))
