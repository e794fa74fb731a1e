"""Several augmented views of each training image, for self-supervised learning (``task=simclr``), chosen
with ``data=<images>_views``.

| ``data=``              | class                    | wraps (``images``, sigma_repro.data.images) | views        |
|------------------------|--------------------------|---------------------------------------------|--------------|
| ``digits_views``       | ``SimCLRViewsDataModule``| ``DigitsDataModule``, 8x8 grey              | 2 SimCLR     |
| ``fashion_mnist_views``| ``SimCLRViewsDataModule``| ``FashionMNISTDataModule``, 28x28 grey      | 2 SimCLR     |
| ``cifar10_views``      | ``SimCLRViewsDataModule``| ``CIFAR10DataModule``, 32x32 RGB            | 2 SimCLR     |

A views DataModule builds the image DataModule named by ``images`` (a class path; the options it
does not know itself, ``batch_size``, ``root``, ``limit_train``..., go to that module unchanged, so
every check and error of the image data stays where it is) and keeps its splits, its normalisation
and its image size and channels (not its training augmentation: the views start from the raw images):

- ``train_dataloader()``: per image a tuple of views, no label (labels never reach training); a batch
  is a list of view tensors, each (B, C, H, W). Order and sharding are ``sigma_repro.data.sampling``'s
  ``ResumableSampler`` (resumes mid-epoch exactly); the views of an image are drawn with the global
  RNGs seeded from that image's own sample seed (``seeded_global_rngs``), a function of
  ``(seed, epoch, index)`` alone: the same views whatever the batch size, the neighbours in the
  batch, the number of workers or ranks.
- ``val_dataloader()``: the wrapped module's validation ``(image, label)`` pairs, unaugmented, for
  the kNN evaluation; ``plain_train_dataloader()``: the training split the same way, every image
  once in order, for the kNN memory bank and the linear probe; ``probe_batch(n)``: as the images'.
- ``model_kwargs``: image size and channels, and ``num_classes=0`` (a backbone without classifier:
  the model returns its pooled features); ``task_kwargs``: ``num_classes`` for the evaluations.

Augmentation (``simclr_view_transform``): the SimCLR recipe with lightly's ``SimCLRViewTransform``
options and defaults (random resized crop, flips, colour jitter, grey scale, Gaussian blur), built from
torchvision's v2 transforms on float tensors and adapted to the data: views of the data's own size,
normalised with its training mean and std per channel, from images scaled to [0, 1] by their own top
level (16 for digits). Colour jitter's saturation and hue and random grey scale leave a single-channel
image as it is (torchvision's v2 functionals skip grey images). A subclass gives other views through
``view_transforms`` (DINO's multi-crop: global and local crops of two sizes).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from sigma_repro.data.base import is_whole
from sigma_repro.data.images import ImageClassificationDataModule, Normalize, TensorImages
from sigma_repro.data.sampling import EpochPrefixSampler, ResumableDataLoader, ResumableSampler, seeded_global_rngs
from sigma_repro.errors import ConfigError


class LevelsToUnit:
    """uint8 pixel levels 0..``max_level`` -> float32 in [0, 1].

    Written here because torchvision's ``ToDtype(scale=True)`` divides by the dtype's range (255),
    and the digits' levels end at 16."""

    def __init__(self, max_level: int):
        self.max_level = max_level

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.float() / self.max_level


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's Gaussian blur kernel, 10% of the image side, made odd; at least 3 (8x8 digits: 3, 224: 23)."""
    return max(3, 2 * round(0.05 * image_size) + 1)


def simclr_view_transform(normalize: Normalize, image_size: int, *, min_scale: float = 0.08, hf_prob: float = 0.5,
                          vf_prob: float = 0.0, cj_prob: float = 0.8, cj_strength: float = 1.0, cj_bright: float = 0.8,
                          cj_contrast: float = 0.8, cj_sat: float = 0.8, cj_hue: float = 0.2,
                          random_gray_scale: float = 0.2, gaussian_blur: float = 0.5,
                          sigmas: Sequence[float] = (0.1, 2.0)) -> Callable:
    """One SimCLR view of a uint8 image (C, H, W) -> float32 (C, image_size, image_size), normalised with
    ``normalize``'s mean and std (the data's training statistics).

    The steps, options and defaults of lightly's ``SimCLRViewTransform`` (random resized crop of at least
    ``min_scale`` of the area, flips, colour jitter with probability ``cj_prob`` and strengths
    ``cj_strength`` x ``cj_bright``/``cj_contrast``/``cj_sat``/``cj_hue``, grey scale, Gaussian blur with
    probability ``gaussian_blur`` and σ in ``sigmas`` pixels, kernel ``blur_kernel_size``), built from
    torchvision's v2 transforms on float tensors: lightly's own blur converts every view to an 8-bit PIL
    image and back, truncating each pixel by up to 1/255 even with the blur off.
    """
    color_jitter = v2.ColorJitter(brightness=cj_strength * cj_bright, contrast=cj_strength * cj_contrast,
                                  saturation=cj_strength * cj_sat, hue=cj_strength * cj_hue)
    return v2.Compose([
        LevelsToUnit(normalize.max_level),
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
        v2.RandomHorizontalFlip(p=hf_prob),
        v2.RandomVerticalFlip(p=vf_prob),
        v2.RandomApply([color_jitter], p=cj_prob),
        v2.RandomGrayscale(p=random_gray_scale),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), sigma=tuple(sigmas))], p=gaussian_blur),
        v2.Normalize(mean=normalize.mean.flatten().tolist(), std=normalize.std.flatten().tolist()),
    ])


def _check_view_options(options: dict[str, Any]) -> None:
    allowed = [name for name, p in inspect.signature(simclr_view_transform).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown SimCLR view option(s) {unknown} under data.view; the options are {allowed} "
                          f"(lightly's SimCLRViewTransform names; the view size and normalisation come from the data)")


class MultiViewImages(Dataset):
    """In-memory uint8 images (N, C, H, W) read with ``(index, sample_seed)`` keys (a ``ResumableSampler``'s):
    item ``(i, s)`` is ``tuple(t(images[i]) for t in view_transforms)``, drawn with the global torch,
    ``random`` and numpy RNGs (torchvision's v2 transforms draw from torch's) seeded by ``s`` and put
    back afterwards. Seeding per image, not per batch as ``SeededView`` does, makes an image's views a
    function of its key alone, at about 0.15 ms per image beside about 0.4 ms per 8x8 SimCLR view."""

    def __init__(self, images: torch.Tensor, view_transforms: Sequence[Callable]):
        self.images, self.view_transforms = images, list(view_transforms)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, sample_seed = key
        with seeded_global_rngs(sample_seed):
            return tuple(transform(self.images[index]) for transform in self.view_transforms)


class ViewsDataModule(ImageClassificationDataModule):
    """Views of the training images of an in-memory image DataModule; see the module docstring.

    images: class path of the image DataModule to wrap (``sigma_repro.data.images.DigitsDataModule``);
        it must hold its images in memory (``TensorImages``: digits, Fashion-MNIST, CIFAR-10).
    images_per_epoch: null: an epoch is every training image once; a number: that many, the first of the
        epoch's random order (different images each epoch; the kNN bank and the probe still use all).
    image_options: that module's own arguments (``batch_size``, ``num_workers``, ``root``, ...), and
        ``seed``, which both use.
    Subclasses implement ``view_transforms(normalize, image_size) -> [transform per view]``.
    """

    def __init__(self, *, images: str, seed: int = 0, images_per_epoch: int | None = None, **image_options: Any):
        try:
            image_class = hydra.utils.get_class(images)
        except (ImportError, ValueError) as error:
            raise ConfigError(f"data.images={images!r} is not an importable class: {error}. Name an image "
                              f"DataModule, e.g. sigma_repro.data.images.DigitsDataModule") from error
        if not (isinstance(image_class, type) and issubclass(image_class, ImageClassificationDataModule)):
            raise ConfigError(f"data.images={images!r} is not an image DataModule (a subclass of "
                              f"sigma_repro.data.images.ImageClassificationDataModule); name one, e.g. "
                              f"sigma_repro.data.images.DigitsDataModule")
        source = image_class(seed=seed, **image_options)
        if not (isinstance(source.train_set, TensorImages) and isinstance(source.val_set, TensorImages)):
            raise ConfigError(f"data.images={images!r} reads its images from files as it trains ("
                              f"{type(source.train_set).__name__}); SSL views need an in-memory image DataModule "
                              f"(digits, Fashion-MNIST, CIFAR-10)")
        if images_per_epoch is not None and not (is_whole(images_per_epoch)
                                                 and source.batch_size <= images_per_epoch <= len(source.train_set)):
            raise ConfigError(f"data.images_per_epoch must be null (every training image once an epoch) or a whole "
                              f"number from data.batch_size={source.batch_size} to the training set's size "
                              f"({len(source.train_set)}); found {images_per_epoch!r}")
        self.source, self.images_per_epoch = source, images_per_epoch
        normalize = source.val_set.transform  # the unaugmented transform: the training statistics
        views = MultiViewImages(source.train_set.images, self.view_transforms(normalize, source.image_size))
        super().__init__(train_set=views, val_set=source.val_set, num_classes=source.num_classes,
                         image_size=source.image_size, channels=source.channels, batch_size=source.batch_size,
                         num_workers=source.num_workers, seed=seed)
        self.plain_train_set = TensorImages(source.train_set.images, source.train_set.labels, normalize)

    def view_transforms(self, normalize: Normalize, image_size: int) -> list[Callable]:
        raise NotImplementedError

    @property
    def model_kwargs(self) -> dict[str, int]:
        return {**super().model_kwargs, "num_classes": 0}  # no classifier: the model returns its pooled features

    def train_dataloader(self) -> ResumableDataLoader:
        # The views dataset reads the sampler's (index, sample seed) keys itself: SeededView would seed once
        # per batch and hand the dataset bare indices.
        trainer = self.trainer  # None outside Lightning: one process
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = (ResumableSampler(len(self.train_set), seed=self.seed, num_replicas=world_size, rank=rank)
                   if self.images_per_epoch is None else
                   EpochPrefixSampler(len(self.train_set), per_epoch=self.images_per_epoch, seed=self.seed,
                                      num_replicas=world_size, rank=rank))
        if len(sampler) < self.batch_size:
            raise ConfigError(
                f"Each of the {world_size} devices gets {len(sampler)} training images an epoch, fewer than "
                f"data.batch_size={self.batch_size} (a per-device batch). Lower data.batch_size, or raise "
                f"data.images_per_epoch.")
        return ResumableDataLoader(self.train_set, sampler=sampler, drop_last=True, trainer=trainer,
                                   **self._loader_options())

    def plain_train_dataloader(self) -> DataLoader:
        """The training split as ``(image, label)`` batches, unaugmented, every image once, in a fixed order."""
        # Batches of at least 256: features only, no activations kept for a backward, so fewer, larger batches.
        # Workers that do not persist: the evaluations build this loader anew each time.
        return DataLoader(self.plain_train_set, shuffle=False, **{
            **self._loader_options(), "batch_size": max(self.batch_size, 256), "persistent_workers": False})

    def describe(self) -> dict[str, Any]:
        return self.source.describe()


class SimCLRViewsDataModule(ViewsDataModule):
    """Two SimCLR views per training image (``simclr_view_transform``, the same options for both, as in SimCLR).

    view: ``simclr_view_transform``'s options (lightly's ``SimCLRViewTransform`` names: ``min_scale``,
        ``hf_prob``, ``cj_prob``, ``cj_strength``, ``gaussian_blur``, ``sigmas``...); the view size and the
        normalisation come from the data.
    """

    def __init__(self, *, view: dict[str, Any] | None = None, **options: Any):
        self.view = OmegaConf.to_container(view) if isinstance(view, DictConfig) else dict(view or {})
        _check_view_options(self.view)
        super().__init__(**options)

    def view_transforms(self, normalize: Normalize, image_size: int) -> list[Callable]:
        transform = simclr_view_transform(normalize, image_size, **self.view)
        return [transform, transform]
