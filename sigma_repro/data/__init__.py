"""DataModules, one per kind of data; real data sets from local paths, embedded defaults that need no download.

Images (``task=classification``): see ``sigma_repro.data.images`` for each data set's layout.
Reproducible, resumable training order: ``sigma_repro.data.sampling``.
"""

from sigma_repro.data.images import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageClassificationDataModule,
    ImageNetDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageClassificationDataModule",
    "ImageNetDataModule",
]
