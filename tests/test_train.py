"""End to end: `mner-train` train / evaluate / predict on a tiny generated dataset with a tiny BERT."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.data import write_split

from mner.trainer.cli import main
from mner.trainer.core.config import ConfigError, TrainConfig, resolve_configs


@pytest.fixture(scope="module")
def trained_run(tiny_data, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny-crf"
    code = main([
        "--data", str(tiny_data), "--model", "bert_crf", "--text-encoder", str(tiny_bert), "--epochs", "2",
        "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--seed", "3", "--out", str(out),
        "--set", "dropout=0.0", "--set", "head_lr=5e-3",
    ])
    assert code == 0
    return out


def test_run_directory_layout_and_metrics(trained_run, tiny_data):
    assert sorted(p.name for p in trained_run.iterdir()) == [
        "config.json", "labels.json", "metrics.json", "mner-run.json", "model.safetensors", "predictions",
        "text_encoder"]
    assert not list(trained_run.parent.glob("*.tmp-*"))  # nothing half-written left behind
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for split in ("dev", "test"):
        assert set(metrics[split]["micro"]) >= {"precision", "recall", "f1", "gold", "pred"}
        assert 0.0 <= metrics[split]["micro"]["f1"] <= 1.0
    assert metrics["test"]["micro"]["gold"] == 12 + 40  # one entity per post + 40 single-word LOCs
    assert metrics["orphan_i"]["train"] == 5 and metrics["repaired_train_tags"] == 5
    assert metrics["alignment"]["train"]["zero_piece"] == 1
    assert metrics["alignment"]["test"]["truncated"] > 0
    assert len(metrics["data_hash"]) == 64 and len(metrics["history"]) == metrics["epochs_run"] == 2
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"] == "bert_crf" and config["model_config"] == {"dropout": 0.0}
    assert config["train_config"]["head_lr"] == 5e-3 and config["train_config"]["epochs"] == 2
    assert config["labels"][0] == "O" and config["data"]["hash"] == metrics["data_hash"]


def test_run_record(trained_run, tiny_bert):
    import hashlib

    import torch
    import transformers

    record = json.loads((trained_run / "metrics.json").read_text())["run"]
    software = record["software"]
    assert software["torch"] == torch.__version__ and software["transformers"] == transformers.__version__
    assert software["mner"] and "git_commit" in software and "cuda" in software
    assert record["seed"] == 3 and record["device"] == "cpu" and record["precision"] == "fp32"
    assert record["world_size"] == 1 and len(record["epoch_seconds"]) == 2
    assert record["peak_memory"]["process_rss_mb"] > 0
    digest = hashlib.sha256(b"model.safetensors\0" + (tiny_bert / "model.safetensors").read_bytes()).hexdigest()
    assert record["text_encoder"]["weights"]["sha256"] == digest


def test_predictions_match_seqeval(trained_run):
    import pyarrow.parquet as pq
    from seqeval.metrics import f1_score

    from mner.trainer.evaluation.evaluate import read_conll_predictions

    gold, pred = read_conll_predictions(trained_run / "predictions" / "test.conll")
    assert len(gold) == 13 and len(gold[-1]) == 41
    assert pred[-1][22:] == ["O"] * 19  # words past max_length 24 ([CLS] + 22 + [SEP]) are predicted O
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert round(metrics["test"]["micro"]["f1"], 4) == round(f1_score(gold, pred), 4)
    table = pq.read_table(trained_run / "predictions" / "test.parquet").to_pydict()
    assert len(table["token"]) == sum(len(g) for g in gold)
    assert table["pred"] == [t for seq in pred for t in seq]
    assert table["post_id"][0] == "test-0" and table["image_id"][0] == "0"


def test_evaluate_and_predict_commands(trained_run, tiny_data, tmp_path, capsys):
    assert main(["evaluate", str(trained_run), "--split", "dev", "--device", "cpu"]) == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    (evaluation,) = (trained_run / "eval").glob("dev-*.json")
    assert json.loads(evaluation.read_text())["micro"] == metrics["dev"]["micro"]

    unlabelled = tmp_path / "posts.txt"
    write_split(unlabelled, [[("john", ""), ("smith", ""), ("in", ""), ("paris", "")]], tags=False)
    out = tmp_path / "tagged.conll"
    assert main(["predict", str(trained_run), "--data", str(unlabelled), "--out", str(out), "--device", "cpu"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "IMGID:0" and [line.split("\t")[0] for line in lines[1:5]] == ["john", "smith", "in", "paris"]
    assert all(len(line.split("\t")) == 2 for line in lines[1:5])


def test_existing_run_is_not_overwritten(trained_run, tiny_data, tiny_bert, capsys):
    code = main(["--data", str(tiny_data), "--text-encoder", str(tiny_bert), "--out", str(trained_run)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "nope"], ["unknown model 'nope'", "bert_crf"]),
        (["--set", "nope=1"], ["unknown config key 'nope'", "dropout", "encoder_lr"]),
        (["--preset", "nope"], ["unknown preset 'nope'", "default"]),
        (["--set", "dropout"], ["key=value"]),
        (["--set", "epochs=two"], ["epochs=two"]),
    ],
)
def test_bad_values_list_valid_ones(args, expected, tiny_data, tiny_bert, tmp_path, capsys):
    code = main(["--data", str(tiny_data), "--text-encoder", str(tiny_bert), "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2
    for text in expected:
        assert text in err
    assert not (tmp_path / "r").exists()


def test_precedence_defaults_preset_set_flags():
    class Model:
        @dataclass
        class Config:
            dropout: float = 0.1  # test field
            use_prompts: bool = True  # test field

        PRESETS = {"paper": {"dropout": 0.3, "epochs": 40, "batch_size": 18}}

    model_config, config = resolve_configs(
        Model,
        preset="paper",
        sets=["use_prompts=false", "batch_size=4", "encoder_lr=1e-5"],
        flags={"batch_size": 7, "seed": None},
    )
    assert model_config == Model.Config(dropout=0.3, use_prompts=False)
    assert config.epochs == 40 and config.batch_size == 7 and config.encoder_lr == 1e-5
    assert config.seed == TrainConfig().seed
    with pytest.raises(ConfigError, match="use_prompts=maybe"):
        resolve_configs(Model, sets=["use_prompts=maybe"])


# ----------------------------------------------------------------------------- runs that read a feature cache


def register_visual_test_model():
    """A bert_crf that adds a projection of the cached CLIP image embedding to every word's emissions."""
    import torch

    from mner.trainer.models import MODEL_REGISTRY, register_model
    from mner.trainer.models.bert_crf import BertCRF

    if "test_visual_crf" in MODEL_REGISTRY:
        return
    seen_batches = []

    @register_model("test_visual_crf")
    class VisualCRF(BertCRF):
        PRESETS = {"default": {}}
        seen = seen_batches

        @staticmethod
        def required_features(config):
            return ["encoders/clip/image_embed"]

        def __init__(self, config, *, labels, text_encoder, tokenizer=None, features=None):
            super().__init__(config, labels=labels, text_encoder=text_encoder, tokenizer=tokenizer)
            (dim,) = features.shapes["encoders/clip/image_embed"]  # sized from the cache, never guessed
            self.visual = torch.nn.Linear(dim, len(labels))

        def word_emissions(self, batch):
            image = batch["visual"]["encoders/clip/image_embed"]  # (B, D)
            self.seen.append({k: tuple(v.shape) for k, v in batch["visual"].items()})
            return super().word_emissions(batch) + self.visual(image).unsqueeze(1)  # (B, W, T)


def test_train_from_cache_posts_with_visual_features(tiny_cache, tiny_bert, tmp_path, capsys):
    from mner.trainer.models import get_model_class

    register_visual_test_model()
    out = tmp_path / "visual-run"
    code = main(["--features", str(tiny_cache), "--model", "test_visual_crf", "--text-encoder", str(tiny_bert),
                 "--epochs", "1", "--batch-size", "16", "--max-length", "24", "--device", "cpu", "--out", str(out),
                 "--max-missing-images", "0.1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "RANDOMLY INITIALISED" in err and "not hold" in err  # loud warning; image 5 missing
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_init_features"] == ["encoders/clip"]
    assert metrics["data_source"]["source"] == "features"
    config = json.loads((out / "config.json").read_text())
    assert config["features"]["required"] == ["encoders/clip/image_embed"]
    assert config["features"]["provenance"]["encoders/clip"]["pretrained"] == "random"
    seen = get_model_class("test_visual_crf").seen
    assert seen and seen[0]["encoders/clip/image_embed"][1] == 16
    # evaluate reuses the recorded cache
    assert main(["evaluate", str(out), "--split", "test", "--device", "cpu"]) == 0


def test_missing_features_name_the_extract_command(tiny_cache, tiny_bert, tmp_path, capsys):
    from mner.trainer.models import MODEL_REGISTRY, register_model
    from mner.trainer.models.bert_crf import BertCRF

    if "test_swin_crf" not in MODEL_REGISTRY:
        register_model("test_swin_crf")(type("SwinCRF", (BertCRF,), {
            "required_features": staticmethod(lambda config: ["encoders/swin/grid"])}))
    code = main(["--features", str(tiny_cache), "--model", "test_swin_crf", "--text-encoder", str(tiny_bert),
                 "--max-length", "24", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "mner-features extract" in err and "swin" in err
    code = main(["--data", "/nonexistent", "--model", "test_swin_crf", "--out", str(tmp_path / "r")])
    assert code == 2


def test_length_grouped_batches_cover_every_post_once_and_reduce_padding():
    from mner.trainer.inputs.batching import LengthGroupedBatchSampler

    rng = random.Random(1)
    lengths = [rng.randint(5, 70) for _ in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, 16, seed=0, window=10)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 63
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    assert first != second  # a new order every epoch
    padded = sum(max(lengths[i] for i in b) * len(b) for b in first)
    assert padded < 1.1 * sum(lengths)


def test_text_encoder_alias_missing_package_says_pip_install(monkeypatch):
    from mner.trainer.inputs import text_encoder

    monkeypatch.setitem(text_encoder.ALIASES, "nope-l6", ("no_such_package_mner", "model", "no-such-package"))
    with pytest.raises(text_encoder.TextEncoderError, match="pip install no-such-package"):
        text_encoder.resolve_text_encoder("nope-l6")
    assert text_encoder.resolve_text_encoder("bert-base-cased") == "bert-base-cased"  # hub names pass through


# ----------------------------------------------------------------------------- the trainer's side of the cache contract


def test_visual_run_refuses_a_cache_without_the_posts_images(tiny_data, tiny_bert, tmp_path, capsys):
    import numpy as np

    from mner.pipeline.cache import CacheWriter, make_provenance

    register_visual_test_model()
    foreign = tmp_path / "foreign.h5"  # built from other posts: none of tiny_data's image ids
    ids = ["x1", "x2"]
    with CacheWriter(foreign, partial=True) as writer:
        writer.write_images(ids, [0, 0], ["", ""], [64, 64], [48, 48])
        embed = np.zeros((2, 16), dtype=np.float16)
        provenance = make_provenance("encoder", model="ViT-B-32", pretrained="random", preprocessing=None,
                                     thresholds=None, image_ids=ids)
        writer.write_group("encoders/clip", {"image_embed": (embed, "image")}, provenance)
    args = ["--data", str(tiny_data), "--features", str(foreign), "--model", "test_visual_crf", "--text-encoder",
            str(tiny_bert), "--epochs", "1", "--batch-size", "16", "--max-length", "24", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "train: 49 of 49 posts (100.0%) name an image that is not in" in err and "--allow-missing-images" in err
    assert not (tmp_path / "refused").exists()

    assert main([*args, "--out", str(tmp_path / "allowed"), "--allow-missing-images"]) == 0
    metrics = json.loads((tmp_path / "allowed" / "metrics.json").read_text())
    assert metrics["image_coverage"]["train"]["not_in_cache"] == 49 and metrics["image_coverage"]["train"]["ok"] == 0
    assert {"images", "encoders/clip"} <= set(metrics["cache"]["groups"]) and metrics["cache"]["fingerprint"]


def test_evaluate_and_predict_name_their_cache_and_warn_when_it_changed(tiny_data, tiny_cache, tiny_bert, tmp_path,
                                                                        capsys):
    import shutil

    import numpy as np

    from mner.pipeline.cache import CacheWriter, FeatureCache, make_provenance

    register_visual_test_model()
    cache = shutil.copy(tiny_cache, tmp_path / "cache.h5")
    run = tmp_path / "run"
    assert main(["--features", str(cache), "--model", "test_visual_crf", "--text-encoder", str(tiny_bert),
                 "--epochs", "1", "--max-length", "24", "--device", "cpu", "--max-missing-images", "0.1",
                 "--out", str(run)]) == 0
    trained = json.loads((run / "metrics.json").read_text())["cache"]["fingerprint"]

    # other data without --features: said, and recorded
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"feature cache: {Path(cache).resolve()}" in err and "without --features" in err
    (first,) = (run / "eval").glob("test-*.json")
    assert first.name.endswith(f"-cache{trained.split(':')[-1][:8]}.json")
    assert "without --features" in json.loads(first.read_text())["warnings"][0]

    # the cache changes in place: the evaluation says so, and gets a file of its own
    ids = FeatureCache(cache).image_ids
    with CacheWriter(cache, partial=True) as writer:
        provenance = make_provenance("encoder", model="clip-test", pretrained="random", preprocessing=None,
                                     thresholds=None, image_ids=ids)
        embed = np.zeros((len(ids), 4), np.float16)
        writer.write_group("encoders/clip-test", {"image_embed": (embed, "image")}, provenance)
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert "changed since the run trained on it" in capsys.readouterr().err
    results = sorted((run / "eval").glob("test-*.json"))
    assert len(results) == 2  # the first result was not overwritten
    changed = next(json.loads(p.read_text()) for p in results if p != first)
    assert changed["cache"]["fingerprint"] != trained and "changed since" in changed["warnings"][0]

    tagged = tmp_path / "tagged.conll"
    assert main(["predict", str(run), "--data", str(tiny_data), "--out", str(tagged), "--device", "cpu"]) == 0
    sidecar = json.loads((tmp_path / "tagged.conll.json").read_text())
    assert sidecar["cache"]["path"] == str(Path(cache).resolve()) and len(sidecar["warnings"]) == 2
