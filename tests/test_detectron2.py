"""The detectron2 backend, exercised for real: model-zoo configs, random weights, the batched path.

detectron2 publishes no wheels; these tests are skipped unless it was built from source
(docs/install.md#detectron2 has the exact steps).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip(
    "detectron2", reason="detectron2 is not installed (no wheels; build steps in docs/install.md)"
)

from mner.features.producers.detectors import DetectorConfig, create_detector

pytestmark = pytest.mark.detectron2
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"


def _images():
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for w, h in [(160, 120), (160, 120), (120, 160)]
    ]


@pytest.fixture(scope="module")
def mask_rcnn():
    return create_detector(
        "detectron2",
        config=DetectorConfig(score_threshold=0.0, top_k=4, min_size=96, random_init=True),
        detectron2_config=MASK_RCNN,
    )


def test_config_scaling_thresholds_and_provenance(mask_rcnn):
    cfg = mask_rcnn.cfg
    assert cfg.INPUT.MIN_SIZE_TEST == 96 and cfg.INPUT.MAX_SIZE_TEST == 160  # max follows min (1333 / 800)
    assert cfg.MODEL.MASK_ON is False  # masks are not stored: no mask head
    fields = mask_rcnn.provenance_fields()
    assert fields["pretrained"] == "random" and fields["model"] == f"detectron2/{MASK_RCNN}"
    assert fields["preprocessing"]["detectron2_config"] == MASK_RCNN
    assert fields["preprocessing"]["config_sha256"].startswith("sha256:")
    assert fields["checkpoint"] == "none (random weights)"
    assert len(mask_rcnn.class_names) == 80


def test_batched_equals_single_image(mask_rcnn):
    images = _images()
    single = [mask_rcnn(image) for image in images]
    inputs = [mask_rcnn.resize_spec.resize(image) for image in images[:2]]  # same padded size
    assert mask_rcnn.batch_key(*inputs[0].shape[1:]) == mask_rcnn.batch_key(*inputs[1].shape[1:])
    batched = mask_rcnn.detect_batch(inputs, [(120, 160), (120, 160)]).split()
    for (b1, s1, c1), (b2, s2, c2) in zip(single[:2], batched):
        assert len(s1) == 4
        np.testing.assert_allclose(b2, b1, atol=1e-3)
        np.testing.assert_allclose(s2, s1, atol=1e-5)
        np.testing.assert_array_equal(c2, c1)
    assert (single[2][0][:, 2] <= 120 + 1e-3).all() and (single[2][0][:, 3] <= 160 + 1e-3).all()


def test_retinanet_reads_its_own_threshold():
    detector = create_detector(
        "detectron2",
        config=DetectorConfig(score_threshold=0.9, top_k=3, min_size=96, random_init=True),
        detectron2_config=RETINANET,
    )
    assert detector.cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.9
    _, scores, _ = detector(_images()[0])
    assert (scores >= 0.9).all() and len(scores) <= 3


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="--detectron2-config"):
        create_detector(
            "detectron2", config=DetectorConfig(random_init=True), detectron2_config="nope/x.yaml"
        )


def test_extract_with_detectron2(tmp_path):
    from mner.features.cli import main
    from mner.pipeline.cache import FeatureCache

    (tmp_path / "images").mkdir()
    for i, image in enumerate(_images()):
        image.save(tmp_path / "images" / f"{i}.jpg")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("".join(f"IMGID:{i}\nJohn\tB-PER\n\n" for i in range(3)))
    out = tmp_path / "d2.h5"
    assert (
        main(
            [
                "extract",
                "--data",
                str(tmp_path / "data"),
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(out),
                "--detector",
                "detectron2",
                "--detectron2-config",
                MASK_RCNN,
                "--random-init",
                "--encoder",
                "clip-test",
                "--score-threshold",
                "0",
                "--top-k",
                "2",
                "--detector-min-size",
                "96",
                "--no-progress",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    cache = FeatureCache(out)
    assert cache.provenance("objects/detectron2")["model"] == f"detectron2/{MASK_RCNN}"
    assert cache.provenance("objects/detectron2")["pretrained"] == "random"
    assert cache.row_shape("crops/detectron2/clip/clip-test/crop_embed") == (64,)
