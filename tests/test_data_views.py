"""Augmented views for self-supervised learning (sigma_repro.data.views), on the embedded digits and a
tiny fake CIFAR-10 tree: views differ and have the data's size and channels; an augmentation-free view is
the validation images' normalisation, recomputed here from the raw pixel levels; an image's views are a
function of (seed, epoch, index) alone (not of the batch size or the rank); the train loader resumes mid
epoch exactly and never yields labels; the evaluation loaders yield unaugmented images with labels;
options the module cannot honour are refused before compute."""

import pytest
import torch

from sigma_repro.data.images import DigitsDataModule
from sigma_repro.data.sampling import ResumableSampler
from sigma_repro.data.views import SimCLRViewsDataModule, blur_kernel_size
from sigma_repro.errors import ConfigError

from .helpers import assert_loader_resumes_mid_epoch
from .test_data import fake_cifar10, fake_image_folder

DIGITS = "sigma_repro.data.images.DigitsDataModule"
# No augmentation at all: a crop of the whole image, no flip, jitter, grey scale or blur.
IDENTITY_VIEW = {"min_scale": 1.0, "hf_prob": 0.0, "vf_prob": 0.0, "cj_prob": 0.0, "random_gray_scale": 0.0,
                 "gaussian_blur": 0.0}
DIGITS_VIEW = {"min_scale": 0.4, "hf_prob": 0.0, "cj_strength": 0.5, "random_gray_scale": 0.0, "gaussian_blur": 0.0}


def digits_views(**options) -> SimCLRViewsDataModule:
    return SimCLRViewsDataModule(**{"images": DIGITS, "batch_size": 16, "view": DIGITS_VIEW, **options})


def test_two_views_per_image_differ_and_have_the_digits_size_and_channel():
    dm = digits_views()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 2  # the views only: no labels reach training
    for view in batch:
        assert view.shape == (16, 1, 8, 8) and view.dtype == torch.float32
    different = (batch[0] - batch[1]).flatten(1).abs().amax(dim=1) > 0.1
    assert different.all()
    assert dm.model_kwargs == {"img_size": 8, "in_chans": 1, "num_classes": 0}  # a backbone without classifier
    assert dm.task_kwargs == {"num_classes": 10}


def test_cifar10_views_are_32x32_rgb_and_blur_has_simclr_kernel(tmp_path):
    fake_cifar10(tmp_path)
    dm = SimCLRViewsDataModule(images="sigma_repro.data.images.CIFAR10DataModule", root=str(tmp_path), batch_size=8,
                               num_workers=0, view={"gaussian_blur": 1.0})
    views = next(iter(dm.train_dataloader()))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2
    assert not torch.equal(views[0], views[1])
    assert dm.model_kwargs == {"img_size": 32, "in_chans": 3, "num_classes": 0}
    # SimCLR's kernel is 10% of the side, odd, at least 3
    assert [blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 5, 11, 23]


def test_a_view_without_augmentation_is_the_normalised_image():
    dm = digits_views(view=IDENTITY_VIEW)
    levels = dm.source.train_set.images.double() / 16  # the training split's pixels in [0, 1]
    mean, std = levels.mean(), levels.std(unbiased=False)
    sampler = ResumableSampler(len(dm.train_set), seed=0)
    for index, sample_seed in sampler.epoch_keys()[:20]:
        expected = ((dm.source.train_set.images[index].double() / 16 - mean) / std).float()
        for view in dm.train_set[(index, sample_seed)]:
            torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_views_are_a_function_of_seed_epoch_and_index_alone():
    small, large = digits_views(batch_size=8, images_per_epoch=256), digits_views(batch_size=32, images_per_epoch=256)
    epoch = 3
    views_by_index = {}
    for dm in (small, large):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        keys = loader.sampler.epoch_keys()
        seen = {}
        for b, batch in enumerate(loader):
            for row, (index, _) in enumerate(keys[b * dm.batch_size:(b + 1) * dm.batch_size]):
                seen[index] = torch.stack([batch[0][row], batch[1][row]])
        views_by_index[dm.batch_size] = seen
    shared = set(views_by_index[8]) & set(views_by_index[32])
    assert len(shared) == 256
    assert all(torch.equal(views_by_index[8][i], views_by_index[32][i]) for i in shared)

    # the same (index, sample seed) pairs whatever the number of ranks, so rank 1 of 2 draws the same views
    one = dict(ResumableSampler(len(small.train_set), seed=0).epoch_keys())
    rank1 = ResumableSampler(len(small.train_set), seed=0, num_replicas=2, rank=1).epoch_keys()
    assert all(one[index] == sample_seed for index, sample_seed in rank1)

    # another epoch or another run seed: other views of the same image
    def views_of(index, seed, epoch):
        sampler = ResumableSampler(len(small.train_set), seed=seed)
        sampler.set_epoch(epoch)
        return torch.stack(small.train_set[(index, dict(sampler.epoch_keys())[index])])

    index = min(shared)
    assert torch.equal(views_of(index, 0, 3), views_by_index[8][index])
    assert not torch.equal(views_of(index, 0, 4), views_of(index, 0, 3))
    assert not torch.equal(views_of(index, 1, 3), views_of(index, 0, 3))
    # drawing views leaves the global RNG where it was (dropout masks do not depend on the data)
    state = torch.random.get_rng_state()
    views_of(index, 0, 3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_train_loader_resumes_mid_epoch_exactly():
    dm = digits_views(batch_size=32, images_per_epoch=320)
    uninterrupted = assert_loader_resumes_mid_epoch(dm.train_dataloader, epoch=2, after=4, key=torch.cat)
    assert len(uninterrupted) == 10


def test_images_per_epoch_takes_that_many_fresh_images_each_epoch():
    dm = digits_views(images_per_epoch=48)
    loader = dm.train_dataloader()
    assert len(loader) == 3
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        full = ResumableSampler(len(dm.train_set), seed=0)
        full.set_epoch(epoch)
        assert list(loader.sampler) == full.epoch_keys()[:48]  # the first 48 of the epoch's order
        assert sum(1 for _ in loader) == 3
        orders.append({i for i, _ in loader.sampler})
    assert orders[0] != orders[1]


def test_evaluation_loaders_yield_unaugmented_images_with_labels():
    dm = digits_views()
    plain = DigitsDataModule(batch_size=16)
    train_images, train_labels = map(torch.cat, zip(*dm.plain_train_dataloader()))
    expected = torch.stack([plain.val_set.transform(image) for image in plain.train_set.images])
    assert torch.equal(train_images, expected) and torch.equal(train_labels, plain.train_set.labels)
    val_images, val_labels = map(torch.cat, zip(*dm.val_dataloader()))
    plain_val_images, plain_val_labels = map(torch.cat, zip(*plain.val_dataloader()))
    assert torch.equal(val_images, plain_val_images) and torch.equal(val_labels, plain_val_labels)
    probe_images, probe_labels = dm.probe_batch(5)
    assert probe_images.shape == (5, 1, 8, 8) and torch.equal(probe_images, plain.probe_batch(5)[0])


def test_bad_view_data_options_are_refused_before_compute(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown SimCLR view option\(s\) \['input_size'\]"):
        digits_views(view={"input_size": 16})
    with pytest.raises(ConfigError, match="not an importable class"):
        digits_views(images="sigma_repro.data.images.NoSuchModule")
    with pytest.raises(ConfigError, match="not an image DataModule"):
        digits_views(images="sigma_repro.data.text.StdlibDataModule")
    with pytest.raises(ConfigError, match="images_per_epoch must be null"):
        digits_views(images_per_epoch=8)  # fewer than one batch of 16
    with pytest.raises(ConfigError, match="images_per_epoch must be null"):
        digits_views(images_per_epoch=True)
    with pytest.raises(ConfigError, match="data.batch_size must be a whole number"):
        digits_views(batch_size=5000)  # the images' own check, unchanged
    fake_image_folder(tmp_path)
    with pytest.raises(ConfigError, match="SSL views need an in-memory image DataModule"):
        SimCLRViewsDataModule(images="sigma_repro.data.images.ImageNetDataModule", root=str(tmp_path), batch_size=2,
                              num_workers=0, image_size=32)
