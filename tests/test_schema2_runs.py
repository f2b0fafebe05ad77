"""Runs trained on schema-2 caches reload: a finished run whose config.json names its groups the old way
(``clip_group``, ``objects``, ``encoders/clip``) is mapped to the schema-3 instances the same models made,
or refused with one error naming the cache to rebuild. The old config is written here by editing a
current tiny run's config.json (no old files are kept in the repository)."""

from __future__ import annotations

import json
import shutil

import h5py
import pytest
from helpers.data import write_generated_splits

from mner.pipeline.cache.tiny import write_tiny_cache
from mner.pipeline.data import load_dataset
from mner.trainer.cli import main

PAPER = {"objects/maskrcnn": "torchvision/maskrcnn_resnet50_fpn", "crops/maskrcnn/clip/ViT-B-16": "open_clip/ViT-B-16",
         "crops/maskrcnn/prompts/ViT-B-16/vcrmner": "open_clip/ViT-B-16"}
OTHER = {"crops/maskrcnn/clip/ViT-B-32": "open_clip/ViT-B-32"}  # a second CLIP instance: must not be picked
OLD_NAMES = {"objects/maskrcnn": "objects", "crops/maskrcnn/clip/ViT-B-16": "encoders/clip",
             "crops/maskrcnn/prompts/ViT-B-16/vcrmner": "prompts/vcrmner"}


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("schema2")
    (root / "data").mkdir()
    data = write_generated_splits(root / "data", seed=3, sizes=(16, 6, 6))
    dataset = load_dataset(data)
    cache = root / "c.h5"
    groups = {**PAPER, **OTHER}
    write_tiny_cache(cache, list(groups), image_ids=sorted(set(dataset.image_ids())), posts=dataset,
                     dims={"D": 16}, provenance={g: {"model": m, "pretrained": "openai"} for g, m in groups.items()})
    run = root / "run"
    assert main(["--features", str(cache), "--model", "vcrmner", "--text-encoder", str(tiny_bert), "--epochs", "1",
                 "--batch-size", "8", "--max-length", "32", "--device", "cpu", "--out", str(run),
                 "--set", "num_blocks=1", "--set", "num_heads=2"]) == 0
    return run, data, cache


def make_schema2(run, out):
    """The run as schema-2 mner wrote it: the old knob instead of the instance slots, old group names."""
    shutil.copytree(run, out)
    config = json.loads((out / "config.json").read_text())
    model_config = config["model_config"]
    assert (model_config.pop("detector"), model_config.pop("clip_model")) == ("maskrcnn", "ViT-B-16")
    model_config["clip_group"] = "clip"
    features = config["features"]
    for key in ("provenance", "groups"):
        features[key] = {OLD_NAMES.get(g, g): v for g, v in features[key].items() if g not in OTHER}
    features["required"] = ["objects/offsets", "encoders/clip/crop_embed", "prompts/vcrmner/crop_weights"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def predict(run, data, cache, out, capsys):
    code = main(["predict", str(run), "--data", str(data / "test.txt"), "--features", str(cache), "--out", str(out)])
    return code, capsys.readouterr().err


def test_a_schema2_run_predicts_and_evaluates_with_the_instances_its_models_made(trained, tmp_path, capsys):
    from mner.trainer.inference.tagger import Tagger

    run, data, cache = trained
    old = make_schema2(run, tmp_path / "old-run")
    code, err = predict(run, data, cache, tmp_path / "new.conll", capsys)
    assert code == 0 and "schema-2" not in err  # a schema-3 run is read as it is
    code, err = predict(old, data, cache, tmp_path / "old.conll", capsys)
    assert code == 0, err
    assert (tmp_path / "old.conll").read_text() == (tmp_path / "new.conll").read_text()  # the same instances read
    assert "encoders/clip -> clip_model ViT-B-16" in err and "objects -> detector maskrcnn" in err
    tagger = Tagger.from_run(old, features=cache)
    assert tagger.run_config["model_config"]["clip_model"] == "ViT-B-16"
    assert "clip_group" not in tagger.run_config["model_config"]
    assert main(["evaluate", str(old), "--data", str(data), "--features", str(cache)]) == 0
    assert main(["report", str(tmp_path / "old-run"), "--out", str(tmp_path / "report")]) == 0


def test_a_schema2_run_whose_model_is_not_in_the_cache_gets_one_error(trained, tmp_path, capsys):
    run, data, cache = trained
    old = make_schema2(run, tmp_path / "old-run")
    config = json.loads((old / "config.json").read_text())
    config["features"]["provenance"]["encoders/clip"]["model"] = "open_clip/RN50"  # trained with another CLIP
    (old / "config.json").write_text(json.dumps(config))
    code, err = predict(old, data, cache, tmp_path / "x.conll", capsys)
    assert code != 0 and "Traceback" not in err
    assert "schema-2 feature cache" in err and "open_clip/RN50" in err and "mner-features extract" in err
    assert not (tmp_path / "x.conll").exists()
    schema2 = tmp_path / "old.h5"  # the run's own cache, still schema 2 (not rebuilt yet)
    with h5py.File(schema2, "w") as handle:
        handle.attrs["mner_schema_version"] = 2
    config["features"]["path"] = str(schema2)
    (old / "config.json").write_text(json.dumps(config))
    code = main(["predict", str(old), "--data", str(data / "test.txt"), "--out", str(tmp_path / "y.conll")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and err.count("mner-train: error") == 1
    # the run's own cache names the command that rebuilds it in place (then the run reads it as above)
    assert f"{schema2}: a schema-2 feature cache" in err and "mner-features extract --data" in err
    assert f"--out {schema2} --overwrite" in err


def test_an_unfinished_schema2_run_is_not_resumed(trained, tmp_path, capsys):
    run, _, _ = trained
    old = make_schema2(run, tmp_path / "old-run")
    marker = json.loads((old / "mner-run.json").read_text())
    (old / "mner-run.json").write_text(json.dumps({**marker, "status": "unfinished"}))
    assert main(["--out", str(old), "--resume"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "schema-2 feature cache" in err and "--overwrite" in err
    assert json.loads((old / "mner-run.json").read_text())["status"] == "unfinished"  # nothing written


@pytest.mark.parametrize("model, knobs, old_groups, expected", [
    ("pmner", {"resnet_group": "resnet152-test"},
     {"objects": "torchvision/fasterrcnn_resnet50_fpn", "encoders/resnet152-test": "torchvision/resnet152"},
     {"detector": "fasterrcnn-test", "resnet_model": "resnet152-test"}),
    ("espvr", {"swin_group": "swin"}, {"encoders/swin": "transformers/microsoft/swin-large"},
     {"swin_model": "swin-large-patch4-window12-384"}),
])
def test_each_old_knob_maps_to_the_instance_its_model_made(tmp_path, model, knobs, old_groups, expected):
    from mner.trainer.core.schema2_runs import is_schema2_run, upgrade_schema2_run

    made = {"objects/fasterrcnn-test": "torchvision/fasterrcnn_resnet50_fpn",
            "objects/maskrcnn": "torchvision/maskrcnn_resnet50_fpn",  # another detector: not picked
            "crops/fasterrcnn-test/resnet/resnet152-test": "torchvision/resnet152",
            "encoders/resnet/resnet152-test": "torchvision/resnet152",
            "encoders/swin/swin-large-patch4-window12-384": "transformers/microsoft/swin-large",
            "encoders/swin/swin-test": "transformers/SwinModel(tiny)"}
    cache = tmp_path / "c.h5"
    write_tiny_cache(cache, list(made), provenance={g: {"model": m, "pretrained": "w"} for g, m in made.items()})
    run_config = {"model": model, "model_config": {"dropout": 0.3, **knobs},
                  "features": {"path": str(cache), "provenance": {g: {"model": m, "pretrained": "w"}
                                                                 for g, m in old_groups.items()},
                               "required": [f"{g}/x" for g in old_groups]}}
    assert is_schema2_run(run_config)
    upgraded, mapped = upgrade_schema2_run(tmp_path / "run", run_config, None)
    assert upgraded["model_config"] == {"dropout": 0.3, **expected} and len(mapped) == len(expected)
    assert not is_schema2_run({**upgraded, "features": None})
