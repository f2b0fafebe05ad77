"""One cache per dataset for every paper (issue 16): ``mner-features extract --for all`` plans one pass from
the models' stage-1 declarations (mner.pipeline.stage1), and every paper preset trains from that cache
with no stage-1 mismatch. Tiny test variants stand in for the real towers, each recording what it stands for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mner.features.cli import main as features_main
from mner.features.run.plan import tiny_variant
from mner.pipeline.cache import FeatureCache
from mner.pipeline.cache.specs import split_path
from mner.pipeline.stage1 import PAPER_NEEDS, paper_needs
from mner.trainer.models import available_models, get_model_class

IDS = ["11", "12", "13", "14", "15", "16"]  # 16 has no picture
POST = "IMGID:{}\nRT\tO\n@John\tB-PER\nSmith\tI-PER\nin\tO\nNew\tB-LOC\nYork\tI-LOC\n"
FAST = ["--detector-min-size", "64", "--chunk-size", "3", "--batch-size", "3", "--no-progress",
        "--caption-beams", "1", "--caption-max-tokens", "4"]  # the captioner's settings refine the plan too


def write_corpus(root: Path) -> tuple[Path, Path]:
    images, data = root / "images", root / "data"
    images.mkdir(parents=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in IDS[:-1]:
        Image.fromarray(rng.integers(0, 255, (56, 72, 3), dtype=np.uint8)).save(images / f"{image_id}.jpg")
    posts = [POST.format(i) for i in IDS]
    (data / "train.txt").write_text("\n".join(posts[:3]) + "\n")
    (data / "valid.txt").write_text("\n".join(posts[3:5]) + "\n")
    (data / "test.txt").write_text("\n".join(posts[4:]) + "\n")
    return data, images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("plan"))


def extract(corpus, out, *extra) -> int:
    data, images = corpus
    return features_main(["extract", "--data", str(data), "--images", str(images), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def all_cache(corpus, tmp_path_factory):
    """One ``--for all`` pass: what every paper preset and ablation row reads (tiny stand-ins)."""
    out = tmp_path_factory.mktemp("all") / "all.h5"
    assert extract(corpus, out, "--for", "all", "--tiny") == 0
    return out


def test_for_all_plans_one_cache_for_every_paper(all_cache, corpus, capsys):
    cache = FeatureCache(all_cache)
    groups = set(cache.groups())
    # two detectors and two CLIP models side by side, each named by what made it
    assert {"objects/maskrcnn-test", "objects/fasterrcnn-test", "encoders/clip/RN50-test",
            "crops/maskrcnn-test/clip/ViT-B-16-test", "crops/fasterrcnn-test/resnet/resnet152-test",
            "prompts/RN50-test/promptmner_kb", "crops/maskrcnn-test/prompts/ViT-B-16-test/vcrmner_words",
            "encoders/swin/swin-test", "grounding", "encoders/clip_grounding", "captions"} <= groups
    # exactly what the papers read (no ViT-B-16 crops of P-MNER's detector, no RN50 crops at all)
    assert not any(g.startswith(("crops/fasterrcnn-test/clip", "crops/maskrcnn-test/resnet")) for g in groups)
    assert cache.provenance("objects/maskrcnn-test")["stands_for"] == {"detector": "maskrcnn"}
    assert cache.provenance("objects/fasterrcnn-test")["for_models"] == ["pmner"]
    assert cache.provenance("captions")["thresholds"]["num_beams"] == 1  # --caption-beams refined the plan
    # the plan is printed first: each group and the papers that need it; a second run computes nothing
    capsys.readouterr()
    assert extract(corpus, all_cache, "--for", "all", "--tiny") == 0
    out = capsys.readouterr().out
    assert out.index("plan:") < out.index("wrote ")
    line = next(row for row in out.splitlines() if "objects/maskrcnn-test " in row)
    assert "kept (in the cache)" in line and "vcrmner" in line
    assert "computed nothing" in out


def test_every_paper_preset_trains_from_the_one_cache(all_cache, tiny_bert, tmp_path, capsys):
    from mner.trainer.cli import main as train_main

    models = sorted(PAPER_NEEDS)
    assert set(models) == set(available_models()) - {"bert_crf"}
    for model in models:
        cls = get_model_class(model)
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        sets = [f"{k}={v}" for k, v in getattr(cls, "TINY_OVERRIDES", {}).items()]  # the model's tiny variant
        sets += ["num_heads=2"] if "num_heads" in fields else []  # the tiny BERT is 32 wide
        sets += ["encoded_max_length=64"] if "encoded_max_length" in fields else []  # and has 64 positions
        run = tmp_path / model
        argv = ["--features", str(all_cache), "--model", model, "--preset", "paper", "--text-encoder", str(tiny_bert),
                "--epochs", "1", "--batch-size", "4", "--max-length", "32", "--device", "cpu", "--out", str(run),
                *[arg for item in sets for arg in ("--set", item)]]
        code = train_main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"{model}: {err[-2000:]}"
        assert "stage-1" not in err and "mismatch" not in err, f"{model}: {err[-2000:]}"
        config = json.loads((run / "config.json").read_text())
        assert config["features"]["stage1_mismatches"] == []
        tiny = {slot: tiny_variant(slot, value) for slot, value in paper_needs(model).slots.items()}
        assert config["features"]["instances"] == tiny  # the tiny variant of each of the paper's models


def test_every_preset_reads_what_its_paper_declares():
    """The declarations stage 1 plans from cover every preset and ablation row the trainer can run."""
    for model in available_models():
        cls = get_model_class(model)
        declared = set(paper_needs(model).paths())
        for preset, values in {"default": {}, **getattr(cls, "PRESETS", {})}.items():
            config = cls.Config(**{k: v for k, v in values.items() if k in cls.Config.__dataclass_fields__})
            read = set(cls.required_features(config))
            assert read <= declared, f"{model}/{preset} reads {sorted(read - declared)}, not in its PaperNeeds"
            settings = {(s.group, s.key) for s in getattr(cls, "stage1_settings", lambda c: [])(config)}
            assert settings <= {(s.group, s.key) for s in paper_needs(model).filled_settings()}, (model, preset)
    for needs in PAPER_NEEDS.values():
        for path in needs.paths():
            split_path(path)  # every declared path is in a declared group


def test_contradicting_flags_are_errors_unless_overridden(corpus, tmp_path, capsys):
    out = tmp_path / "p.h5"
    assert extract(corpus, out, "--for", "pmner", "--tiny", "--top-k", "3") == 1
    err = capsys.readouterr().err
    assert "--top-k 3 contradicts pmner's objects/fasterrcnn-test thresholds.top_k >= 5" in err
    assert "--override-paper" in err and not out.exists()
    # compatible flags refine: a lower score threshold, a larger top-k
    assert extract(corpus, out, "--for", "pmner", "--tiny", "--top-k", "7", "--score-threshold", "0.2") == 0
    thresholds = FeatureCache(out).provenance("objects/fasterrcnn-test")["thresholds"]
    assert thresholds["top_k"] == 7 and thresholds["score_threshold"] == pytest.approx(0.2)
    forced = tmp_path / "forced.h5"
    assert extract(corpus, forced, "--for", "pmner", "--tiny", "--top-k", "3", "--override-paper") == 0
    out_text = capsys.readouterr().out
    assert "OVERRIDE" in out_text
    provenance = FeatureCache(forced).provenance("objects/fasterrcnn-test")
    assert provenance["thresholds"]["top_k"] == 3 and "contradicts" in provenance["paper_overrides"][0]
    assert extract(corpus, forced, "--for", "nope") == 1
    assert "valid: all, espvr, mgipscl, pmner, promptmner, vcrmner" in capsys.readouterr().err


def test_another_detector_adds_an_instance_and_keeps_the_first(corpus, tmp_path, capsys):
    import h5py

    out = tmp_path / "d.h5"
    assert extract(corpus, out, "--random-init", "--detector", "fasterrcnn-test", "--encoder", "clip",
                   "--clip-model", "clip-test") == 0

    def contents():
        with h5py.File(out, "r") as handle:
            return {name: {k: v[()].tobytes() for k, v in handle[name].items() if isinstance(v, h5py.Dataset)}
                    for name in FeatureCache(out).groups()}

    first = contents()
    assert extract(corpus, out, "--random-init", "--detector", "maskrcnn-test", "--encoder", "clip",
                   "--clip-model", "clip-test") == 0
    after = contents()
    assert {g: after[g] for g in first} == first  # byte for byte
    assert {"objects/maskrcnn-test", "crops/maskrcnn-test/clip/clip-test"} == set(after) - set(first)
    # the same detector with other thresholds is kept, and the summary says what was not recomputed
    capsys.readouterr()
    assert extract(corpus, out, "--random-init", "--detector", "maskrcnn-test", "--top-k", "2", "--encoder",
                   "clip", "--clip-model", "clip-test") == 0
    out_text = capsys.readouterr().out
    assert "NOT COMPUTED: objects/maskrcnn-test kept with top_k 10 (asked 2)" in out_text
