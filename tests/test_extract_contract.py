"""Issue 7, stage 1: one writer per cache, loud failure on bad input, consistency when a cache grows,
exact provenance and streaming assembly (tiny random models, generated images)."""

from __future__ import annotations

import json
import os
import socket
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.data import write_dataset
from helpers.extract import TINY, noise, noise_corpus

from mner.features.cli import main
from mner.pipeline.cache import STATUS_NAMES, FeatureCache


@pytest.fixture()
def corpus(tmp_path):
    return tmp_path, *noise_corpus(tmp_path, missing=("d",))  # "d" is missing


def run(data, images, out, *extra, capsys=None) -> int:
    images_args = ["--images", str(images)] if images is not None else []
    return main(["extract", "--data", str(data), *images_args, "--out", str(out), *TINY, *extra])


def no_parts(folder: Path) -> bool:
    return not list(folder.glob("*.parts")) and not list(folder.glob("*.lock")) and not list(folder.glob("*.tmp-*"))


# ------------------------------------------------------------------------------------ one writer per cache


def test_second_writer_is_refused_naming_the_holder(corpus, capsys):
    """Another live writer (here: pid 1 on this host, always alive) holds the cache: nothing is written."""
    root, data, images = corpus
    out = root / "locked.h5"
    Path(f"{out}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1,
                                               "started": "2026-01-01T00:00:00+00:00", "token": "other"}))
    assert run(data, images, out, "--prompts", "vcrmner") == 1
    err = capsys.readouterr().err
    assert f"pid 1 on host {socket.gethostname()}, started 2026-01-01T00:00:00+00:00" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.parts").exists()
    Path(f"{out}.lock").unlink()  # the holder is gone: the run goes through
    assert run(data, images, out, "--prompts", "vcrmner") == 0 and not Path(f"{out}.lock").exists()


def test_chunk_temp_names_carry_host_and_pid(tmp_path, monkeypatch):
    """A part is a cache written by the cache writer: temp name with host and pid, then renamed."""
    from mner.features.run import parts
    from mner.pipeline.cache import writer

    seen = []
    real_replace = os.replace
    monkeypatch.setattr(writer.os, "replace", lambda a, b: (seen.append(str(a)), real_replace(a, b)))
    chunk = parts.ChunkRows(ids=["a"], images={"status": np.zeros(1, np.uint8)}, causes=[""])
    parts.write_part(tmp_path / "chunk_00000.h5", chunk, [])
    assert seen and seen[0].endswith(f".tmp-{socket.gethostname()}-{os.getpid()}")
    assert parts.read_part_images(tmp_path / "chunk_00000.h5").ids == ["a"]


# ------------------------------------------------------------------------------------------ bad input


def test_missing_or_empty_images_folder_is_an_error(corpus, capsys):
    root, data, _ = corpus
    (root / "empty").mkdir()
    for folder, words in ((root / "typo", "no such folder"), (root / "empty", "folder is empty")):
        assert run(data, folder, root / "x.h5") == 1
        err = capsys.readouterr().err
        assert words in err and "--no-images" in err and len(err.strip().splitlines()) == 1
    assert not (root / "x.h5").exists() and no_parts(root)


@pytest.mark.parametrize("flag,value,valid", [("--batch-size", "0", ">= 1"), ("--chunk-size", "0", ">= 1"),
                                              ("--crop-quality", "500", "1..95"),
                                              ("--max-bad-images", "2", "0..1")])
def test_bad_numbers_are_one_line_errors_leaving_nothing(corpus, capsys, flag, value, valid):
    root, data, images = corpus
    assert run(data, images, root / "x.h5", flag, value) == 1
    err = capsys.readouterr().err
    assert flag in err and valid in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (root / "x.h5").exists() and no_parts(root)


def test_image_ids_that_leave_the_folder_are_refused_with_file_and_line(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    noise(tmp_path / "images" / "ok.jpg", 0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("IMGID:ok\nJohn\tB-PER\n\nIMGID:../outside\nParis\tB-LOC\n")
    assert run(data, tmp_path / "images", tmp_path / "x.h5") == 1
    err = capsys.readouterr().err
    assert f"{data / 'train.txt'}:4" in err and "'../outside'" in err and len(err.strip().splitlines()) == 1
    from mner.features.run.images import load_image

    assert load_image(tmp_path / "images", "/etc/hostname").status == "missing"  # second guard


def test_no_images_is_explicit_and_recorded(corpus, capsys):
    root, data, _ = corpus
    out = root / "blind.h5"
    assert run(data, None, out, "--no-images", "--encoder", "resnet152-test") == 0
    assert "no-images-folder 4" in capsys.readouterr().out
    cache = FeatureCache(out)
    assert [STATUS_NAMES[s] for s in cache.status] == ["placeholder"] * 4
    assert cache.provenance("objects/fasterrcnn-test")["images"] == "none (--no-images)"
    assert run(data, root / "images", out, "--no-images") == 1  # both: which one is meant?


def test_summary_counts_bad_images_by_cause_and_max_share(corpus, capsys):
    root, data, images = corpus
    (images / "c.jpg").write_bytes(b"<html>not an image</html>")
    assert run(data, images, root / "x.h5", "--encoder", "resnet152-test", "--max-bad-images", "0.25") == 2
    err = capsys.readouterr().err
    assert "2 of 4 images are not usable (corrupt 1, no-file 1)" in err and "--max-bad-images 0.25" in err
    assert not (root / "x.h5").exists() and no_parts(root)
    assert run(data, images, root / "x.h5", "--encoder", "resnet152-test", "--max-bad-images", "0.5") == 0
    assert "not ok by cause: corrupt 1, no-file 1" in capsys.readouterr().out
    assert main(["info", str(root / "x.h5")]) == 0
    info = capsys.readouterr().out
    assert "1  placeholder: corrupt" in info and "1  placeholder: no-file" in info


# ---------------------------------------------------------------------------- consistency when a cache grows


def test_another_clip_model_adds_an_instance_and_prompts_follow_their_clip(corpus, capsys):
    """Asking for another CLIP model than cached adds an instance (never a silent no-op) and keeps the first
    byte for byte; a prompt set is embedded by the CLIP instance it names, with that instance's weights."""
    root, data, images = corpus
    out = root / "clip.h5"
    assert run(data, images, out, "--encoder", "clip") == 0
    first = {group: datasets_of(out, group) for group in FeatureCache(out).groups()}
    assert set(first) == {"objects/fasterrcnn-test", "encoders/clip/clip-test", "crops/fasterrcnn-test/clip/clip-test"}
    capsys.readouterr()
    assert run(data, images, out, "--prompts", "vcrmner", "--clip-model", "RN50-test") == 0
    printed = capsys.readouterr().out
    assert "encoders/clip/RN50-test" in printed and "kept (in the cache)" in printed  # the plan, printed first
    cache = FeatureCache(out)
    assert {"encoders/clip/RN50-test", "prompts/RN50-test/vcrmner",
            "crops/fasterrcnn-test/prompts/RN50-test/vcrmner"} <= set(cache.groups())
    assert {group: datasets_of(out, group) for group in first} == first  # the first instance, byte for byte
    assert cache.provenance("encoders/clip/RN50-test")["stands_for"] == {"clip_model": "RN50"}
    # a group added to a random-weight instance without --random-init is refused before any compute
    before = out.read_bytes()
    argv = ["extract", "--data", str(data), "--images", str(images), "--out", str(out), "--no-progress",
            "--encoder", "clip", "--clip-model", "ViT-S-32", "--detector", "fasterrcnn-test"]
    assert run(data, images, out, "--encoder", "clip", "--clip-model", "ViT-S-32", "--top-k", "3") == 0
    capsys.readouterr()
    assert main([*argv, "--prompts", "vcrmner_words"]) == 1
    err = capsys.readouterr().err
    assert "encoders/clip/ViT-S-32 features come from random weights" in err
    assert "--clip-model ViT-S-32 --random-init" in err and no_parts(root)
    assert out.read_bytes() != before  # (the ViT-S-32 run before it added that instance)


def datasets_of(path, group) -> dict:
    with h5py.File(path, "r") as handle:
        return {key: value[()].tobytes() for key, value in handle[group].items() if isinstance(value, h5py.Dataset)}


def test_image_fingerprints_refuse_a_grown_cache_over_changed_images(corpus, capsys):
    root, data, images = corpus
    out = root / "grow.h5"
    assert run(data, images, out, "--encoder", "resnet152-test") == 0
    with h5py.File(out, "r") as handle:
        stored = [v.decode() for v in handle["images/content_sha256"][()]]
    import hashlib

    assert stored[0] == hashlib.sha256((images / "a.jpg").read_bytes()).hexdigest() and stored[3] == ""
    noise(images / "a.jpg", 99)  # changed
    noise(images / "d.jpg", 3)  # restored
    (images / "b.jpg").unlink()  # newly missing
    capsys.readouterr()
    assert run(data, images, out, "--encoder", "clip") == 2
    err = capsys.readouterr().err
    assert "changed 1: a" in err and "restored 1: d" in err and "newly missing 1: b" in err and "--overwrite" in err
    assert "encoders/clip/clip-test" not in FeatureCache(out).groups() and no_parts(root)
    assert run(data, images, out, "--encoder", "clip", "--encoder", "resnet152-test", "--overwrite") == 0
    assert [STATUS_NAMES[s] for s in FeatureCache(out).status] == ["ok", "placeholder", "ok", "ok"]


# ------------------------------------------------------------------------------------------ provenance


def test_provenance_command_is_absolute_and_test_variants_are_random(corpus, monkeypatch):
    root, data, images = corpus
    monkeypatch.chdir(root)
    out = root / "prov.h5"
    assert main(["extract", "--data", "data", "--images", "images", "--out", "prov.h5", *TINY,
                 "--encoder", "clip"]) == 0
    provenance = FeatureCache(out).provenance("encoders/clip/clip-test")
    assert provenance["cwd"] == str(root)
    command = provenance["command"]
    assert command[0] == "mner-features" and str(data) in command and str(images) in command
    assert str(out) in command
    argv = ["extract", "--data", str(data), "--images", str(images), "--out", str(out), "--no-progress",
            "--detector", "fasterrcnn-test", "--encoder", "resnet152-test"]  # no --random-init: random all the same
    assert main(argv) == 0
    provenance = FeatureCache(out).provenance("encoders/resnet/resnet152-test")
    assert provenance["pretrained"] == "random" and provenance["random_init"] is True


def test_torchvision_weights_name_and_file_hash(tmp_path, monkeypatch):
    import torch
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    from mner.features.producers.weights import hf_revision, pretrained_tag, torchvision_checkpoint

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = MaskRCNN_ResNet50_FPN_Weights.DEFAULT
    checkpoint = tmp_path / "checkpoints" / Path(weights.url).name
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    found = torchvision_checkpoint(weights)
    assert found["weights"] == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1" and found["checkpoint"] == str(checkpoint)
    assert found["sha256"] == "sha256:" + __import__("hashlib").sha256(b"weights").hexdigest()
    assert pretrained_tag(found) == f"MaskRCNN_ResNet50_FPN_Weights.COCO_V1 {found['sha256']}"

    class Config:
        _name_or_path, _commit_hash = "microsoft/swin-large-patch4-window12-384", "0123abc"

    assert hf_revision(type("M", (), {"config": Config()})()) == {
        "source": "microsoft/swin-large-patch4-window12-384", "revision": "0123abc"}


# ---------------------------------------------------------------------------------- streaming assembly


def test_assembly_streams_one_chunk_at_a_time(tmp_path, monkeypatch):
    """Peak memory of assembly is bounded by a chunk, and temporary disk by the cache's size."""
    from mner.features.run import extract as extract_module

    ids = [str(i) for i in range(32)]
    (tmp_path / "images").mkdir()
    for i in ids:
        noise(tmp_path / "images" / f"{i}.jpg", int(i), size=(640, 480))
    data = write_dataset(tmp_path / "data", ids)
    peaks = {}
    original = extract_module.Extraction._assemble

    def traced(self, *args):
        tracemalloc.start()
        try:
            return original(self, *args)
        finally:
            peaks["assemble"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    monkeypatch.setattr(extract_module.Extraction, "_assemble", traced)
    # the writer fingerprints each dataset in reads of HASH_BLOCK bytes (16 MiB: a constant, not the data's
    # size); shrink it so this small test sees what grows with the data
    monkeypatch.setattr("mner.pipeline.cache.base.HASH_BLOCK", 1 << 16)
    options = extract_module.ExtractOptions(
        data=str(data), images=str(tmp_path / "images"), out=str(tmp_path / "s.h5"), detector="fasterrcnn-test",
        encoders=[], random_init=True, score_threshold=0.0, top_k=3, detector_min_size=64, chunk_size=1, batch_size=4,
        crop_quality=95, progress=False)
    summary = extract_module.run_extraction(options)
    with h5py.File(tmp_path / "s.h5", "r") as handle:
        crop_bytes = int(handle["objects/fasterrcnn-test/crop_jpeg"].shape[0])
    assert crop_bytes > 0.9 * os.path.getsize(tmp_path / "s.h5")  # objects only: the cache is mostly JPEG crops
    # the old assembly joined every crop in RAM (>= 2x the crop bytes); now one chunk (1/32) at a time, a few
    # copies of it (zip member, array, HDF5 write) plus a fixed ~0.5 MB (library metadata, h5py)
    assert peaks["assemble"] < crop_bytes / 2, (peaks, crop_bytes)
    assert 0 < summary.parts_bytes <= 1.3 * summary.cache_bytes
    assert "temporary disk: parts" in str(summary)


def test_resume_recomputes_chunks_whose_images_changed(corpus, monkeypatch):
    """A killed run's finished chunks are reused only for the same image files."""
    from mner.features.run import extract as extract_module

    root, data, images = corpus
    out = root / "resume.h5"
    calls = []
    original = extract_module.Extraction._process_chunk
    monkeypatch.setattr(extract_module.Extraction, "_process_chunk",
                        lambda self, chunk, first: (calls.append(list(chunk)), original(self, chunk, first))[1])
    monkeypatch.setattr(extract_module.Extraction, "_assemble", lambda self, paths: (_ for _ in ()).throw(
        KeyboardInterrupt()))  # "killed" after every chunk is saved
    argv = [*TINY, "--chunk-size", "2", "--encoder", "resnet152-test"]
    assert main(["extract", "--data", str(data), "--images", str(images), "--out", str(out), *argv]) != 0
    assert calls == [["a", "b"], ["c", "d"]] and list(Path(f"{out}.parts").rglob("chunk_*.h5"))
    noise(images / "c.jpg", 42)  # changed while the run was down
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(extract_module.Extraction, "_process_chunk",
                        lambda self, chunk, first: (calls.append(list(chunk)), original(self, chunk, first))[1])
    assert run(data, images, out, "--chunk-size", "2", "--encoder", "resnet152-test") == 0
    assert calls == [["c", "d"]]  # chunk a, b resumed; c, d recomputed from the new file
    with h5py.File(out, "r") as handle:
        import hashlib

        expected = hashlib.sha256((images / "c.jpg").read_bytes()).hexdigest()
        assert handle["images/content_sha256"][2].decode() == expected
