"""Crops cut once on the device, the persistent prefetching loader, and the chunk stages built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mner.features.producers.crops import CropBank, cut_crops, jpeg_crops
from mner.features.producers.detectors import DetectorConfig, ResizeSpec, create_detector
from mner.features.producers.encoders import EncoderConfig, InputSpec, create_encoder
from mner.features.run.images import decode_jpeg
from mner.features.run.loader import DecodedImage, ImageLoader, LoaderSpec
from mner.features.run.stages import ImageStages, StageClock
from mner.pipeline.background import BackgroundWriter


def _picture(seed=0, size=(160, 120)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _tensor(image):
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_cut_crops_equal_roi_align_on_the_whole_image():
    from torchvision.ops import roi_align

    image = _tensor(_picture())
    boxes = torch.tensor([[10.3, 5.7, 60.2, 90.1], [0, 0, 160, 120], [100.5, 80.2, 101.0, 80.4]])
    crops = cut_crops(image, boxes, 32)  # only the boxes' window is converted to float
    fixed = boxes.clone()
    fixed[2, 2:] = fixed[2, :2] + 1  # degenerate boxes get one pixel
    whole = roi_align(image.float()[None] / 255, [fixed], (32, 32), 1.0, -1, True)
    assert crops.shape == (3, 3, 32, 32)
    torch.testing.assert_close(crops, whole, atol=1e-6, rtol=0)
    assert cut_crops(image, torch.zeros(0, 4), 32).shape == (0, 3, 32, 32)


def test_crop_bank_cuts_each_side_once_for_every_encoder():
    images = [_tensor(_picture(1)), _tensor(_picture(2, (90, 200)))]
    boxes = [torch.tensor([[0.0, 0, 50, 50], [20, 30, 100, 110]]), torch.zeros(0, 4)]
    bank = CropBank(images, boxes, {224, 64})
    assert bank.counts == [2, 0] and set(bank.by_size) == {224, 64}
    assert bank[224].shape == (2, 3, 224, 224) and float(bank[224].max()) <= 1.0


def test_jpeg_crops_match_the_stored_crop_policy():
    image = np.asarray(_picture(3, (400, 300)))
    crops = jpeg_crops(
        image, np.array([[0, 0, 400, 300], [10.5, 10.5, 30, 12]], np.float32), max_side=128, quality=90
    )
    assert [decode_jpeg(c).size for c in crops] == [(128, 96), (20, 2)]
    assert jpeg_crops(image, np.zeros((0, 4), np.float32), max_side=128, quality=90) == []


def _write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _picture(i, (160, 120) if i % 2 else (120, 160)).save(folder / f"{i}.jpg")
    return [str(i) for i in range(count)]


def test_loader_workers_hand_over_resized_uint8_in_order(tmp_path):
    ids = [*_write_images(tmp_path, 5), "missing"]
    spec = LoaderSpec(str(tmp_path), 2048, ResizeSpec(96, 160), (InputSpec(32, "center_crop"), InputSpec(48)))
    loader = ImageLoader(spec, ids, num_workers=1, prefetch=4)  # one worker process, persistent for the shard
    first, rest = loader.take(2), loader.take(4)
    items = first + rest
    assert [item.image_id for item in items] == ids and items[-1].status == "missing"
    ok = items[0]
    assert ok.original.dtype == torch.uint8 and ok.original.shape == (3, 160, 120)
    assert ok.detector_input.shape == (3, 128, 96) and ok.detector_input.dtype == torch.uint8
    assert ok.encoder_inputs[InputSpec(32, "center_crop")].shape == (3, 32, 32)
    assert ok.encoder_inputs[InputSpec(48)].shape == (3, 48, 48)
    assert items[-1].original is None and items[-1].detector_input is None
    loader.close()


def test_loader_applies_exif_orientation(tmp_path):
    picture = _picture(4, (160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the displayed image is 120 wide, 160 high
    picture.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    loader = ImageLoader(LoaderSpec(str(tmp_path)), ["rotated"], num_workers=0)
    item = loader.take(1)[0]
    assert (item.width, item.height) == (120, 160) and item.original.shape == (3, 160, 120)


def test_pin_memory_keeps_everything():
    item = DecodedImage(
        "a",
        "ok",
        original=torch.zeros(3, 4, 4, dtype=torch.uint8),
        encoder_inputs={InputSpec(4): torch.ones(3, 4, 4, dtype=torch.uint8)},
    )
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA (the DataLoader only pins with a GPU)")
    pinned = item.pin_memory()
    assert pinned.original.is_pinned() and pinned.encoder_inputs[InputSpec(4)].is_pinned()


class _Models:
    def __init__(self):
        self.detector = create_detector(
            "fasterrcnn-test", config=DetectorConfig(score_threshold=0.0, top_k=3, min_size=96)
        )
        self.encoders = {
            name: create_encoder(name, config=EncoderConfig()) for name in ("clip-test", "resnet152-test")
        }
        self.stages = ImageStages("cpu", batch_size=2, crop_batch_size=4, writer=BackgroundWriter())
        self.spec = LoaderSpec(
            "", 2048, self.detector.resize_spec, tuple({e.image_input: 0 for e in self.encoders.values()})
        )

    def loader(self, folder, ids):
        return ImageLoader(
            LoaderSpec(str(folder), 2048, self.spec.detector, self.spec.encoder_inputs), ids, num_workers=0
        )


@pytest.fixture(scope="module")
def models():
    return _Models()


def test_stages_equal_the_one_image_paths(models, tmp_path):
    ids = _write_images(tmp_path, 5)
    items = models.loader(tmp_path, [*ids, "gone"]).take(6)
    stages = models.stages
    result = stages.process(models.detector, models.encoders, items, crop_jpeg=(64, 90))
    assert result.rows == [0, 1, 2, 3, 4] and len(result.boxes) == 5
    clip = models.encoders["clip-test"]
    for position, image_id in enumerate(ids):
        picture = Image.open(tmp_path / f"{image_id}.jpg").convert("RGB")
        boxes, scores, _ = models.detector(picture)
        np.testing.assert_allclose(result.boxes[position], boxes, atol=1e-3)
        np.testing.assert_allclose(result.scores[position], scores, atol=1e-5)
        alone = clip.encode_images([picture])["image_embed"][0]
        np.testing.assert_allclose(
            result.image_arrays["clip-test"]["image_embed"][position], alone, atol=2e-3
        )
        assert len(result.crop_jpegs[position].result()) == 3
    m = sum(len(b) for b in result.boxes)
    assert result.crop_arrays["clip-test"]["crop_embed"].shape == (m, 64)
    assert result.crop_arrays["resnet152-test"]["crop_pooled"].shape == (m, 2048)
    assert np.abs(result.crop_arrays["resnet152-test"]["crop_pooled"].astype(np.float32)).sum(1).min() > 0
    # crop features of one image equal that image computed alone (no batch-mate dependence)
    alone = stages.process(models.detector, models.encoders, items[3:4])
    np.testing.assert_allclose(
        alone.crop_arrays["clip-test"]["crop_embed"].astype(np.float32),
        result.crop_arrays["clip-test"]["crop_embed"][9:12].astype(np.float32),
        atol=2e-3,
    )
    assert {"detector", "crops", "encoder clip-test", "encoder resnet152-test"} <= set(stages.clock.wall)


def test_shared_device_inputs_hold_one_window_not_the_chunk(models, tmp_path):
    """Device memory scales with --batch-size, not --chunk-size (issue 19, point 7): the chunk's scratch
    dict keeps the crops and inputs of one window of batch_size images; encoders with one input size
    still share what the window holds, and the features equal a fresh computation."""
    ids = _write_images(tmp_path, 5)
    items = models.loader(tmp_path, ids).take(5)
    boxes = [np.array([[0, 0, 50, 40], [10, 10, 90, 100]], np.float32)] * 5
    shared: dict = {}
    stages = models.stages  # batch_size 2: windows at 0, 2, 4
    clip = stages.crop_features(models.encoders["clip-test"], items, boxes, shared)
    image = stages.image_features(models.encoders["clip-test"], items, shared)
    windows = lambda kind: [key for key in shared if key[0] == kind]  # noqa: E731
    assert len(windows("crops")) == 1 and len(windows("inputs")) == 1
    last = shared[windows("crops")[0]]
    assert len(last) == 2  # the last window: one image, two crops
    resnet = stages.crop_features(models.encoders["resnet152-test"], items, boxes, shared)  # also 224
    assert len(windows("crops")) == 1
    fresh = stages.crop_features(models.encoders["clip-test"], items, boxes, {})
    np.testing.assert_array_equal(clip["crop_embed"], fresh["crop_embed"])
    np.testing.assert_array_equal(image["image_embed"],
                                  stages.image_features(models.encoders["clip-test"], items, {})["image_embed"])
    assert resnet["crop_pooled"].shape == (10, 2048)


def test_stages_with_cached_boxes_need_no_detector(models, tmp_path):
    ids = _write_images(tmp_path, 2)
    items = models.loader(tmp_path, ids).take(2)
    boxes = [np.array([[0, 0, 50, 40]], np.float32), np.zeros((0, 4), np.float32)]
    result = models.stages.process(None, models.encoders, items, cached_boxes=boxes)
    assert result.boxes == [] and result.crop_arrays["clip-test"]["crop_embed"].shape == (1, 64)


def test_stage_clock_records_wall_and_thread_cpu():
    clock = StageClock(torch.device("cpu"))
    with clock("work"):
        sum(range(200000))
    assert clock.wall["work"] > 0 and clock.thread_cpu["work"] > 0 and clock.device_seconds() == {}
