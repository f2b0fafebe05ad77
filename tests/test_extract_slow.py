"""Slow acceptance runs: the real towers' shapes (meta device), SIGKILL + resume, shards + merge == one run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.data import datasets_of, write_dataset
from PIL import Image

from mner.features.cli import main
from mner.features.run.extract import shard_of
from mner.pipeline.cache import FeatureCache

pytestmark = pytest.mark.slow
SMALL = ["--random-init", "--score-threshold", "0", "--detector-min-size", "96", "--no-progress"]


def write_images(folder: Path, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for image_id in ids:
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / f"{image_id}.jpg")


def all_datasets(path) -> dict:
    with h5py.File(path, "r") as handle:
        groups = [g for g in ("images", "posts") if g in handle]
        handle.visititems(lambda name, obj: groups.append(name)
                          if isinstance(obj, h5py.Group) and "provenance" in obj.attrs else None)
    return {group: datasets_of(path, group)[0] for group in groups}


# The papers' towers are checked on PyTorch's meta device: the real layer layout and output shapes,
# no weights in memory and no arithmetic. The runs below use the registered tiny variants.
REAL_ARCHITECTURES = {
    ("resnet152", ""): {"grid": (7, 7, 2048), "crop_pooled": (2048,)},  # P-MNER
    ("swin", ""): {"grid": (12, 12, 1536)},  # ESPVR: Swin-L/4 w12 at 384
    ("clip", "ViT-B-32"): {"image_embed": (512,), "patch_tokens": (49, 768), "crop_embed": (512,)},
    ("clip", "ViT-B-16"): {"image_embed": (512,), "patch_tokens": (196, 768), "crop_embed": (512,)},  # VCRMNER
}


@pytest.mark.parametrize(("encoder", "clip_model"), list(REAL_ARCHITECTURES), ids=lambda v: v or "-")
def test_real_architectures_declare_the_shapes_they_compute(encoder, clip_model):
    import torch

    from mner.features.producers.encoders import EncoderConfig, create_encoder

    options = {"clip_model": clip_model} if clip_model else {}
    with torch.device("meta"):
        tower = create_encoder(encoder, config=EncoderConfig(device="meta", random_init=True, **options))
        side = tower.image_input.size
        computed = tower.forward_images(torch.zeros(2, 3, side, side, device="meta"))
        if tower.crop_size:
            computed |= tower.forward_crops(torch.zeros(3, 3, tower.crop_size, tower.crop_size, device="meta"))
    declared = tower.image_datasets | tower.crop_datasets
    assert {name: tuple(array.shape[1:]) for name, array in computed.items()} == declared
    assert declared == REAL_ARCHITECTURES[encoder, clip_model]


def test_groups_added_later_keep_the_first_bytes(tmp_path):
    ids = ["1", "2", "3"]
    write_images(tmp_path / "images", ids)
    data = write_dataset(tmp_path / "data", ids)
    out = tmp_path / "real.h5"
    common = ["extract", "--data", str(data), "--images", str(tmp_path / "images"), "--out", str(out),
              *SMALL, "--top-k", "2", "--batch-size", "2", "--clip-model", "clip-test"]
    assert main([*common, "--detector", "maskrcnn-test", "--encoder", "clip", "--encoder", "resnet152-test",
                 "--prompts", "vcrmner"]) == 0
    with h5py.File(out, "r") as handle:
        m = int(handle["objects/maskrcnn-test/offsets"][-1])
        assert m == 6
        assert handle["encoders/clip/clip-test/image_embed"].shape[0] == 3
        assert handle["encoders/clip/clip-test/patch_tokens"].shape[:2] == (3, 49)  # the ViT-B-32 token layout
        assert handle["encoders/resnet/resnet152-test/grid"].shape == (3, 7, 7, 2048)
        assert handle["encoders/resnet/resnet152-test/grid"].dtype == np.float16
        assert handle["crops/maskrcnn-test/resnet/resnet152-test/crop_pooled"].shape == (m, 2048)
        assert handle["prompts/clip-test/vcrmner/centroids"].shape[0] == 4
    before = all_datasets(out)
    tiny = ["--detector", "maskrcnn-test"]
    assert main([*common, *tiny, "--encoder", "swin-test", "--prompts", "promptmner_expert"]) == 0
    after = all_datasets(out)
    assert {g: after[g] for g in before} == before  # first groups byte-identical
    cache = FeatureCache(out)
    assert cache.row_shape("encoders/swin/swin-test/grid") == (12, 12, 256)
    assert cache.provenance("encoders/swin/swin-test")["pretrained"] == "random"
    # an encoder added later reads the cached crops: same as computing it in the first run
    fresh = tmp_path / "fresh.h5"
    assert main([*common[:6], str(fresh), *common[7:], *tiny, "--encoder", "resnet152-test"]) == 0
    grow = tmp_path / "grow.h5"
    assert main([*common[:6], str(grow), *common[7:], *tiny, "--encoder", "clip"]) == 0
    assert main([*common[:6], str(grow), *common[7:], *tiny, "--encoder", "resnet152-test"]) == 0
    for group in ("encoders/resnet/resnet152-test", "crops/maskrcnn-test/resnet/resnet152-test"):
        assert all_datasets(grow)[group] == all_datasets(fresh)[group]


def _argv(data, images, out, *extra):
    return ["extract", "--data", str(data), "--images", str(images), "--out", str(out), *SMALL, "--top-k", "2",
            "--detector", "maskrcnn-test", "--clip-model", "clip-test", "--encoder", "clip", "--encoder", "swin-test",
            "--prompts", "vcrmner",
            "--chunk-size", "2", "--batch-size", "2", *extra]


def _chunk_files(parts: Path) -> int:
    """Finished chunk files now (0 while the folder is absent or being removed by the assembly)."""
    try:
        return len(list(parts.rglob("chunk_*.h5")))
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ids = [str(i) for i in range(24)]
    write_images(tmp_path / "images", ids)
    data = write_dataset(tmp_path / "data", ids)
    # the reference runs exactly like the killed runs: same process kind and thread count, since
    # the float summation order (and so the last bit of a box) depends on the number of threads
    env = dict(os.environ, OMP_NUM_THREADS="1")
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

    def command(out):
        argv = _argv(data, tmp_path / "images", out)
        del argv[argv.index("swin-test") - 1: argv.index("swin-test") + 1]  # no transformers import: 5 processes
        return [sys.executable, "-m", "mner.features.cli", *argv]

    reference = tmp_path / "reference.h5"
    started = time.monotonic()
    subprocess.run(command(reference), check=True, **quiet)
    full_run_seconds = time.monotonic() - started
    out = tmp_path / "killed.h5"
    parts = Path(f"{out}.parts")
    rng = random.Random(0)
    killed_mid_run = 0
    for finished in (1, 3):
        # kill once `finished` more chunk files exist (plus a random delay): on a loaded machine a kill
        # at a fixed share of the reference run's time often lands before the first or after the last chunk
        process = subprocess.Popen(command(out), **quiet)
        before = _chunk_files(parts)
        deadline = time.monotonic() + 3 * full_run_seconds
        while process.poll() is None and time.monotonic() < deadline and \
                _chunk_files(parts) < before + finished:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_mid_run += parts.exists() and any(parts.rglob("chunk_*.h5"))
        if out.exists():  # a kill after the rename: the cache must be complete and valid
            FeatureCache(out)
    assert killed_mid_run, "no kill landed between two finished chunks: the test checked nothing"
    subprocess.run(command(out), check=True, **quiet)
    assert all_datasets(out) == all_datasets(reference)
    assert not Path(f"{out}.parts").exists()
    assert not list(tmp_path.glob("killed.h5.tmp-*"))


def test_shards_merge_equals_single_run(tmp_path):
    ids = [str(i) for i in range(8)]
    assert {shard_of(i, 2) for i in ids} == {0, 1}
    write_images(tmp_path / "images", ids[:-1])  # one missing image too
    data = write_dataset(tmp_path / "data", ids)
    single = tmp_path / "t.h5"
    assert main(_argv(data, tmp_path / "images", single)) == 0
    out = tmp_path / "s.h5"
    for index in (0, 1):
        assert main(_argv(data, tmp_path / "images", out, "--shard", f"{index}/2")) == 0
    shards = [tmp_path / "s.shard0of2.h5", tmp_path / "s.shard1of2.h5"]
    merged = tmp_path / "merged.h5"
    assert main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    a, b = all_datasets(merged), all_datasets(single)
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        for key in a[group]:
            if a[group][key] != b[group][key]:  # float16 features may differ by batch mates: 1 ulp at most
                x = np.frombuffer(a[group][key], np.float16).astype(np.float32)
                y = np.frombuffer(b[group][key], np.float16).astype(np.float32)
                np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-3, err_msg=f"{group}/{key}")
