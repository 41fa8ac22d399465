"""plugin.training: the reproducible pieces the DreamBooth script is built from."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

import plugin
from plugin import AdapterConfig
from plugin.training import (
    DreamBoothDataset,
    EpochSampler,
    collate_fn,
    copy_adapter_tensors,
    prediction_target,
    seeded_generator,
    to_model_input,
)
from tests.conftest import TINY_UNET, randomize


def test_random_draws_depend_only_on_their_keys():
    a = torch.randn(4, generator=seeded_generator(1, 0, 7))
    assert torch.equal(a, torch.randn(4, generator=seeded_generator(1, 0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=seeded_generator(1, 0, 8)))
    assert not torch.equal(a, torch.randn(4, generator=seeded_generator(2, 0, 7)))


def test_the_shuffle_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    again = EpochSampler(10, seed=3)
    again.set_epoch(2)
    assert list(again) == order  # a fresh sampler (a resumed run) sees the same epoch
    again.set_epoch(3)
    assert list(again) != order


def test_images_become_square_model_inputs_with_reproducible_crops():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8))
    centre = to_model_input(image, 32, center_crop=True)
    assert centre.shape == (3, 32, 32) and centre.min() >= -1 and centre.max() <= 1
    crop = to_model_input(image, 32, center_crop=False, rng=np.random.default_rng([1, 2]))
    assert torch.equal(crop, to_model_input(image, 32, center_crop=False, rng=np.random.default_rng([1, 2])))


def test_prior_preservation_batches_put_class_examples_second():
    example = {
        "instance_images": torch.zeros(3, 4, 4),
        "instance_prompt_ids": torch.tensor([1, 2]),
        "class_images": torch.ones(3, 4, 4),
        "class_prompt_ids": torch.tensor([3, 4]),
    }
    batch = collate_fn([example, example], with_prior_preservation=True)
    assert batch["pixel_values"].shape == (4, 3, 4, 4)
    assert batch["pixel_values"][2:].eq(1).all() and batch["input_ids"][2:].eq(torch.tensor([3, 4])).all()


def test_v_prediction_targets_the_velocity():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(
        prediction_target(scheduler, latents, noise, t), scheduler.get_velocity(latents, noise, t)
    )
    assert prediction_target(DDPMScheduler(), latents, noise, t) is noise


def test_copying_a_checkpoint_into_live_adapters_keeps_the_parameters():
    torch.manual_seed(0)
    trained = UNet2DConditionModel(**TINY_UNET)
    plugin.add_adapter(trained, AdapterConfig(method="liera", rank=2), "default")
    randomize(trained)
    tensors = plugin.adapter_state_dict(trained, "default", prefix="unet.")
    fresh = UNet2DConditionModel(**TINY_UNET)
    plugin.add_adapter(fresh, AdapterConfig(method="liera", rank=2), "default")
    params = list(fresh.parameters())
    copy_adapter_tensors(tensors, {"unet": fresh}, "default")
    assert all(a is b for a, b in zip(params, fresh.parameters()))
    for key, value in plugin.adapter_state_dict(fresh, "default", prefix="unet.").items():
        assert torch.equal(value, tensors[key])
    with pytest.raises(ValueError, match="does not match the adapter"):
        copy_adapter_tensors(
            {k: v for k, v in tensors.items() if "conv1" not in k}, {"unet": fresh}, "default"
        )


def test_random_flip_mirrors_some_images_and_draws_the_same_crops(tmp_path):
    """Square images (no room to crop): each example is the image or its mirror, both occur, the
    draws repeat, and without --random_flip nothing is mirrored."""
    path = tmp_path / "subject.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)

    def dataset(random_flip: bool) -> DreamBoothDataset:
        return DreamBoothDataset([path] * 16, "a sks", None, 32, seed=3, random_flip=random_flip,
                                 tokenize=lambda prompt: torch.tensor([[len(prompt)]]))  # fmt: skip

    plain, flipped, again = dataset(False), dataset(True), dataset(True)
    mirrored = []
    for index in range(16):
        image, candidate = plain[index]["instance_images"], flipped[index]["instance_images"]
        assert torch.equal(candidate, image) or torch.equal(candidate, image.flip(-1))
        mirrored.append(not torch.equal(candidate, image))
        assert torch.equal(again[index]["instance_images"], candidate)
    assert 0 < sum(mirrored) < 16
    unflipped = to_model_input(Image.open(path), 32, center_crop=True)
    assert all(torch.equal(plain[index]["instance_images"], unflipped) for index in range(16))


def test_random_zoom_shows_parts_of_the_image_the_right_way_round(tmp_path):
    """A red-left, blue-right square: zoomed crops differ from item to item, repeat with the seed,
    keep red on the left and blue on the right, each at most 1.5 times its half of the crop."""
    path = tmp_path / "two-tone.png"
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16, 0], pixels[:, 16:, 2] = 255, 255
    Image.fromarray(pixels).save(path)

    def dataset(**zoom) -> DreamBoothDataset:
        return DreamBoothDataset([path] * 16, "a sks", None, 32, seed=3, **zoom,
                                 tokenize=lambda prompt: torch.tensor([[len(prompt)]]))  # fmt: skip

    zoomed, again = dataset(random_zoom=1.5), dataset(random_zoom=1.5)
    crops = []
    for index in range(16):
        example = zoomed[index]
        image = example["instance_images"]
        assert torch.equal(again[index]["instance_images"], image)
        assert image[0, :, 0].min() > 0.9 and image[2, :, -1].min() > 0.9  # red left, blue right
        red_columns = int((image[0, 0] > 0).sum())  # the red half's width in the crop
        assert 32 - 16 * 1.5 - 1 <= red_columns <= 16 * 1.5 + 1
        crops.append((tuple(example["instance_crop_top_left"]), red_columns))
    assert len(set(crops)) > 4
    assert all(torch.equal(dataset()[i]["instance_images"], dataset(random_zoom=1.0)[i]["instance_images"])
               for i in range(4))  # fmt: skip
    with pytest.raises(ValueError, match="random_zoom must be at least 1"):
        dataset(random_zoom=0.5)
