"""Image-classification DataModules for the ViT task (``task=classification``), chosen with ``data=<name>``.

| ``data=``        | class                     | images                      | read from                        |
|------------------|---------------------------|-----------------------------|----------------------------------|
| ``digits``       | ``DigitsDataModule``      | 1,437 / 360, 8x8 grey, 10   | scikit-learn's bundled copy      |
| ``fashion_mnist``| ``FashionMNISTDataModule``| 60,000 / 10,000, 28x28 grey | idx files (Debian package)       |
| ``cifar10``      | ``CIFAR10DataModule``     | 50,000 / 10,000, 32x32 RGB  | the python-pickle batches        |
| ``imagenet``     | ``ImageNetDataModule``    | 1.28M / 50,000, RGB, 1000   | ImageFolder tree of JPEGs        |

Each exposes ``num_classes``, ``image_size`` (square side), ``channels`` (published to the ViT as
``model_kwargs`` and to the task as ``task_kwargs``, see ``sigma_repro.data.base``), ``train_dataloader()``,
``val_dataloader()`` (the held-out split the paper reports on) and ``probe_batch(n)``, a fixed
batch of validation images for the diagnostics. Files are read, and checked, in the constructor:
a missing or malformed data set raises ``ConfigError`` before any compute, naming the path and the
expected layout. Nothing is downloaded. Training order and augmentation come from
``sigma_repro.data.sampling``: a function of ``(seed, epoch)`` that resumes mid-epoch exactly.
"""

import gzip
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from sigma_repro.data.base import StabilityDataModule
from sigma_repro.data.sampling import ResumableDataLoader, ResumableSampler, SeededView
from sigma_repro.errors import ConfigError

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


class ImageClassificationDataModule(StabilityDataModule):
    """What every image DataModule shares: the loaders, the probe batch and the attributes.

    A subclass reads its data and passes ``train_set`` (index -> (image, label); its transform may
    be random) and ``val_set`` (the same, deterministic). ``batch_size`` is per device. Training
    batches are drop-last, shuffled by ``ResumableSampler`` from ``seed`` and sharded over the
    trainer's ranks; loaders draw worker seeds from their own generators, so loading data never
    moves the global RNG the model's dropout uses.
    """

    def __init__(
        self,
        *,
        train_set: Dataset,
        val_set: Dataset,
        num_classes: int,
        image_size: int,
        channels: int,
        batch_size: int,
        num_workers: int,
        seed: int,
    ):
        super().__init__()
        if not 1 <= batch_size <= len(train_set):
            raise ConfigError(
                f"data.batch_size must be a whole number from 1 to the training set's size ({len(train_set)}); "
                f"found {batch_size}. Set data.batch_size in that range."
            )
        self.train_set, self.val_set = train_set, val_set
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    @property
    def model_kwargs(self) -> dict[str, int]:
        return {"img_size": self.image_size, "in_chans": self.channels, "num_classes": self.num_classes}

    @property
    def task_kwargs(self) -> dict[str, int]:
        return {"num_classes": self.num_classes}

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer  # None outside Lightning: one process, epochs from loader.sampler.set_epoch
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(len(self.train_set), seed=self.seed, num_replicas=world_size, rank=rank)
        if len(sampler) < self.batch_size:
            raise ConfigError(
                f"Each of the {world_size} devices gets {len(sampler)} training images, fewer than "
                f"data.batch_size={self.batch_size} (a per-device batch). Lower data.batch_size."
            )
        return ResumableDataLoader(
            SeededView(self.train_set), sampler=sampler, drop_last=True, trainer=trainer, **self._loader_options()
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, shuffle=False, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        """The same held-out split as ``val_dataloader``, for ``Trainer.test``."""
        return self.val_dataloader()

    def probe_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` validation images and labels, evenly spaced over the validation set; always the same."""
        if not 1 <= n <= len(self.val_set):
            raise ConfigError(
                f"probe batch size must be between 1 and the validation set size ({len(self.val_set)}); "
                f"found {n}. Set callbacks.diagnostics.probe_size lower."
            )
        indices = torch.linspace(0, len(self.val_set) - 1, n).round().long().tolist()
        images, labels = zip(*(self.val_set[i] for i in indices))
        return torch.stack(images), torch.as_tensor(labels)


class TensorImages(Dataset):
    """In-memory images: ``images`` (N, C, H, W) uint8 and ``labels`` (N,); item i is
    ``(transform(images[i]), labels[i])``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class Normalize:
    """uint8 levels 0..``max_level`` (C, H, W) -> float32 in [0, 1] -> ``(x - mean) / std`` per channel.

    ``mean`` and ``std`` are those of the training images in [0, 1], per channel (population std).
    """

    def __init__(self, train_images: torch.Tensor, max_level: int):
        # exact statistics from a histogram of the levels, without a float copy of the images
        levels = torch.arange(256, dtype=torch.float64) / max_level
        counts = torch.stack([torch.bincount(plane.flatten(), minlength=256) for plane in train_images.unbind(1)])
        counts = counts.double() / counts.sum(dim=1, keepdim=True)
        mean = counts @ levels
        std = (counts @ levels**2 - mean**2).sqrt()
        self.max_level = max_level
        self.mean, self.std = mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / self.max_level - self.mean) / self.std


def _in_memory_sets(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    max_level: int,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Dataset]:
    """Train and val ``TensorImages``, normalised with the training statistics; ``augment`` (applied
    to the uint8 image, before normalising) for train only."""
    normalize = Normalize(train[0], max_level)
    train_transform = normalize if augment is None else v2.Compose([augment, normalize])
    return {"train_set": TensorImages(*train, train_transform), "val_set": TensorImages(*val, normalize)}


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's bundled digits: 1,797 real 8x8 grey images of 10 digits, pixel levels 0-16.

    Fixed stratified split, 1,437 train / 360 val, drawn with split seed 0 whatever the run seed, so
    every run is scored on the same 360 images. Pixels scaled to [0, 1], then normalised with the
    training mean and std. Held in memory: no workers needed.
    """

    def __init__(self, *, batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), levels 0-16
        labels = torch.from_numpy(digits.target)
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=360, stratify=digits.target, random_state=0
        )
        train, val = (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])
        super().__init__(
            **_in_memory_sets(train, val, max_level=16),
            num_classes=10,
            image_size=8,
            channels=1,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )


FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


class FashionMNISTDataModule(ImageClassificationDataModule):
    """Fashion-MNIST: 60,000 train / 10,000 test 28x28 grey images of 10 kinds of clothing.

    Layout: the four idx files, each plain or ``.gz``::

        {train-images-idx3, train-labels-idx1, t10k-images-idx3, t10k-labels-idx1}-ubyte[.gz]

    either in ``root/FashionMNIST/raw/`` (torchvision's layout) or directly in ``root`` (the Debian
    package ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist). Normalised
    with the mean and std of all 60,000 training images. ``limit_train`` keeps that many training
    images, a fixed random subset (split seed 0) whatever the run seed.
    """

    def __init__(
        self,
        *,
        root: str = FASHION_MNIST_DEBIAN_ROOT,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        limit_train: int | None = None,
    ):
        files = _find_fashion_mnist(Path(root))
        train, val = (_read_fashion_mnist_split(files, split) for split in ("train", "val"))
        sets = _in_memory_sets(train, val, max_level=255)
        if limit_train is not None:
            sets["train_set"] = _fixed_subset(sets["train_set"], limit_train)
        super().__init__(
            **sets,
            num_classes=10,
            image_size=28,
            channels=1,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )


def _fixed_subset(dataset: TensorImages, limit: int) -> TensorImages:
    """The first ``limit`` images of a fixed permutation (seed 0), so every run trains on the same ones."""
    if not 1 <= limit <= len(dataset):
        raise ConfigError(
            f"data.limit_train must be between 1 and the training set size ({len(dataset)}); found {limit}. "
            "Set it in that range, or to null for the whole set."
        )
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return TensorImages(dataset.images[keep], dataset.labels[keep], dataset.transform)


def _find_fashion_mnist(root: Path) -> dict[str, Path]:
    candidates = [root / "FashionMNIST" / "raw", root]
    for directory in candidates:
        found = {}
        for key, name in FASHION_MNIST_FILES.items():
            for path in (directory / name, directory / f"{name}.gz"):
                if path.is_file():
                    found[key] = path
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    present = sorted(p.name for d in candidates if d.is_dir() for p in d.iterdir())
    raise ConfigError(
        f"No Fashion-MNIST data under data.root={root}. Expected the four files "
        f"{', '.join(FASHION_MNIST_FILES.values())} (each plain or .gz) in {candidates[0]} "
        f"(torchvision's layout) or in {root} itself; "
        f"found {present if present else 'no files' if root.is_dir() else 'no such directory'}. "
        f"To fix: apt-get install dataset-fashion-mnist and set data.root={FASHION_MNIST_DEBIAN_ROOT}, "
        "or point data.root at your copy."
    )


def _read_fashion_mnist_split(files: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) of the "train" or "val" (t10k) split."""
    images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
    images = torch.from_numpy(_read_idx(images_path, ndim=3)).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_path, ndim=1)).long()
    if images.shape[1:] != (1, 28, 28) or len(images) != len(labels):
        raise ConfigError(
            f"Expected N 28x28 images in {images_path} and N labels in {labels_path}; found images of "
            f"shape {tuple(images.shape[1:])} and {len(images)} images, {len(labels)} labels. "
            "Replace them with an intact copy of Fashion-MNIST."
        )
    return images, labels


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """An idx file of uint8 (MNIST's format): 4-byte magic (0, 0, 0x08, ndim), ndim big-endian
    uint32 sizes, then the data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as error:  # a truncated or non-gzip .gz
            raise ConfigError(f"Cannot read {path}: {error}. Replace it with an intact copy.") from error
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4")) if len(raw) >= header else ()
    if raw[:4] != bytes([0, 0, 0x08, ndim]) or len(raw) != header + int(np.prod(shape)):
        raise ConfigError(
            f"{path} is not an idx file of uint8 with {ndim} dimension(s): expected the header "
            f"00 00 08 {ndim:02x} then {ndim} sizes and that many bytes; found header {raw[:4].hex(' ')} "
            f"and {len(raw)} bytes. Replace it with an intact copy."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable, for torch


CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10: 50,000 train / 10,000 test 32x32 colour images of 10 classes.

    Layout (the "python version" archive, untarred)::

        root/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch}

    each a pickle of a dict with ``b"data"``, (N, 3072) uint8 in R, G, B planes of 32x32, and
    ``b"labels"``, N ints in 0-9. Read directly (torchvision's CIFAR10 insists on the original
    files' md5) with ``CIFARUnpickler``, which runs no code a crafted file names. Normalised with
    the training mean and std per channel; with ``augment``, training images get the standard random
    32x32 crop of the image padded by 4 (zeros) and a horizontal flip at random.
    """

    def __init__(
        self, *, root: str, batch_size: int = 128, num_workers: int = 2, seed: int = 0, augment: bool = True
    ):
        directory = Path(root) / "cifar-10-batches-py"
        train, val = (_read_cifar_batches(directory, CIFAR10_FILES[split]) for split in ("train", "val"))
        crop_and_flip = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]) if augment else None
        super().__init__(
            **_in_memory_sets(train, val, max_level=255, augment=crop_and_flip),
            num_classes=10,
            image_size=32,
            channels=3,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )


class CIFARUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: a pickle may call any function it names, so only
    what the format's dict of bytes, ints, lists and a numpy uint8 array needs is admitted (numpy's
    array and dtype reconstruction; ``_codecs.encode``, which protocol 2 uses for bytes)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it asks to call {module}.{name}, which a CIFAR-10 batch never does, so it was not loaded "
                f"(a pickle can run any code it names)"
            )
        return super().find_class(module, name)


def _read_cifar_batches(directory: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) from CIFAR-10 pickle batches."""
    layout = f"{', '.join(CIFAR10_FILES['train'] + CIFAR10_FILES['val'])} in {directory}"
    images, labels = [], []
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ConfigError(
                f"CIFAR-10 file {path} not found. Expected {layout} (the python version of CIFAR-10, "
                "cifar-10-python.tar.gz, untarred into data.root). Point data.root at the directory "
                "that holds cifar-10-batches-py."
            )
        try:
            with open(path, "rb") as f:
                batch = CIFARUnpickler(f, encoding="bytes").load()
            data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"{path} is not a CIFAR-10 batch: expected a pickled dict with b'data' and b'labels'; found "
                f"{type(error).__name__}: {error}. Replace it with the file from cifar-10-python.tar.gz."
            ) from error
        if data.dtype != np.uint8 or data.shape[1:] != (3072,) or batch_labels.shape != data.shape[:1]:
            raise ConfigError(
                f"{path} is not a CIFAR-10 batch: expected b'data' (N, 3072) uint8 and N b'labels'; found "
                f"data {data.dtype} {data.shape} and {batch_labels.shape} labels. Replace it with the file "
                "from cifar-10-python.tar.gz."
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(batch_labels.astype(np.int64)))
    return torch.cat(images), torch.cat(labels)


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet-1k (or any ImageFolder tree), with timm's DeiT-style transforms.

    Layout (torchvision ``ImageFolder``; val images sorted into class folders)::

        root/train/<wnid>/*.JPEG
        root/val/<wnid>/*.JPEG

    ``num_classes`` is the number of class folders, which must be the same in train and val.
    Training: timm's ``create_transform(is_training=True)``: random-resized crop to ``image_size``
    (bicubic), flip, ``auto_augment`` (a timm policy string, or null), ``color_jitter`` (timm ignores
    it while an auto-augment policy is set), random erasing with probability ``re_prob``. Eval: resize
    to ``image_size / 0.875``, centre crop ``image_size``. ImageNet mean/std. Mixup and CutMix are not
    provided: they mix labels, which is the task's business, not the loader's.

    Images are decoded when read (``CheckedImageFolder``): the first unreadable file stops the run with
    its name, before its batch is trained on; with ``skip_corrupt`` each is replaced by the next readable
    file and a warning counts them (``unreadable_files`` lists them).
    """

    def __init__(
        self,
        *,
        root: str,
        batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
        image_size: int = 224,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float = 0.4,
        skip_corrupt: bool = False,
    ):
        train_dir, val_dir = _check_image_folders(Path(root))
        train_transform = create_transform(
            input_size=image_size,
            is_training=True,
            auto_augment=auto_augment,
            re_prob=re_prob,
            color_jitter=color_jitter,
            interpolation="bicubic",
        )
        val_transform = create_transform(
            input_size=image_size, is_training=False, interpolation="bicubic", crop_pct=0.875
        )
        train_set, val_set = _image_folder(train_dir, train_transform), _image_folder(val_dir, val_transform)
        super().__init__(
            train_set=train_set,
            val_set=val_set,
            num_classes=len(train_set.classes),
            image_size=image_size,
            channels=3,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.root, self.skip_corrupt, self._skipped_reported = Path(root), skip_corrupt, 0

    @property
    def unreadable_files(self) -> list[str]:
        """The image files found unreadable so far (train, then val), in this process and its loader workers."""
        return [dataset.samples[i][0] for dataset in (self.train_set, self.val_set)
                for i in dataset.unreadable.nonzero().flatten().tolist()]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Before each batch (train or val) goes to the device: stop at the first unreadable image file,
        naming it; with ``skip_corrupt``, say how many have been skipped whenever that number grows."""
        if not (self.train_set.unreadable.any() or self.val_set.unreadable.any()):
            return batch
        unreadable = self.unreadable_files
        if not self.skip_corrupt:
            raise ConfigError(
                f"Cannot read image file {unreadable[0]}: {_load_error(unreadable[0])}. Expected every file under "
                f"{self.root / 'train'} and {self.root / 'val'} to be an image PIL can decode. Replace or delete "
                f"it, or set data.skip_corrupt=true to train without unreadable files (each is replaced by the "
                f"next readable file of its split and counted)."
            )
        if len(unreadable) > self._skipped_reported:
            self._skipped_reported = len(unreadable)
            warnings.warn(f"data.skip_corrupt=true: {len(unreadable)} unreadable image file(s) under {self.root} "
                          f"replaced so far (latest seen: {unreadable[-1]})", stacklevel=1)
        return batch


IMAGE_FOLDER_LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, the same class folders in both"


def _check_image_folders(root: Path) -> tuple[Path, Path]:
    """train and val dirs of an ImageFolder tree, with the same non-empty set of class folders."""
    classes = {}
    for split in ("train", "val"):
        directory = root / split
        classes[split] = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        if not classes[split]:
            raise ConfigError(
                f"No class folders in {directory}. Expected {IMAGE_FOLDER_LAYOUT} (ImageNet: val images "
                "sorted into their wnid folders). Point data.root at such a tree."
            )
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ConfigError(
            f"Class folders of {root / 'train'} ({len(classes['train'])}) and {root / 'val'} "
            f"({len(classes['val'])}) differ: only in train {only_train[:5]}, only in val {only_val[:5]} "
            f"(at most 5 shown). Expected {IMAGE_FOLDER_LAYOUT}. Add or remove folders so they match."
        )
    return root / "train", root / "val"


class CheckedImageFolder(ImageFolder):
    """An ``ImageFolder`` that survives image files PIL cannot decode, and remembers them.

    Files are decoded only when read, in the loader workers: decoding ImageNet's 1.28M files up front
    would take hours. An unreadable file (truncated, not an image) is marked in ``unreadable``, one
    bool per file in shared memory, so the main process sees marks made by its workers; the item is
    replaced by the next readable file of the split, with its label, so the batch still forms.
    ``ImageNetDataModule.on_before_batch_transfer`` reads the marks: it stops the run naming the file,
    or with ``skip_corrupt`` counts the files it skipped.
    """

    def __init__(self, root: Path, transform: Callable):
        super().__init__(root, transform=transform)
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        first = range(len(self.samples))[index]  # IndexError past the end, as ImageFolder: `for` loops stop
        for i in (j % len(self.samples) for j in range(first, first + len(self.samples))):
            path, label = self.samples[i]
            try:
                image = self.loader(path)
            except (OSError, SyntaxError):  # PIL's errors for truncated, broken or non-image files
                self.unreadable[i] = True
                continue
            return (self.transform(image) if self.transform is not None else image), label
        raise ConfigError(f"None of the {len(self.samples)} image files under {self.root} can be read. Expected "
                          f"{IMAGE_FOLDER_LAYOUT}, of images PIL can decode. Point data.root at an intact copy.")


def _load_error(path: str) -> str:
    """Why PIL cannot decode the image file ``path`` (read again here, in the main process)."""
    try:
        default_loader(path)
    except (OSError, SyntaxError) as error:
        return f"{type(error).__name__}: {error}"
    return "it could not be read earlier (it reads now: a failing disk or a file being written?)"


def _image_folder(directory: Path, transform: Callable) -> CheckedImageFolder:
    try:
        return CheckedImageFolder(directory, transform=transform)
    except FileNotFoundError as error:  # a class folder without image files
        raise ConfigError(f"{error} under {directory}. Expected {IMAGE_FOLDER_LAYOUT}.") from error
