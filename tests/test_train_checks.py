"""Fail before training: every option checked when the config is resolved, one line naming the fix;
labels from the training split; model-owned parameter groups."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers.data import make_post, write_generated_splits, write_split

from mner.trainer.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # test only: an EVENT type twice, and a post longer than the tiny BERT's 64 positions
    extra_test = [[("rt", "O"), ("game", "B-EVENT"), ("love", "I-EVENT")], [("game", "B-EVENT")],
                  [("rt", "O")] + [("london", "B-LOC")] * 80]
    return write_generated_splits(tmp_path_factory.mktemp("check-data"), seed=2, sizes=(16, 4, 4),
                                  extra_test=extra_test)


def run(args, data, tiny_bert, out, capsys) -> tuple[int, str]:
    code = main(["--data", str(data), "--text-encoder", str(tiny_bert), "--max-length", "24", "--device", "cpu",
                 "--out", str(out), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--batch-size", "-2"], "--batch-size -2: must be >= 1"),
        (["--num-workers", "-1"], "--num-workers -1: must be >= 0"),
        (["--epochs", "0"], "--epochs 0: must be >= 1"),
        (["--set", "eval_batch_size=0"], "--set eval_batch_size=0: must be >= 1"),
        (["--set", "dropout=2"], "--set dropout=2.0: dropout must be in [0, 1)"),
        (["--set", "train_fraction=0"], "--set train_fraction=0.0: must be in (0, 1]"),
        (["--set", "train_fraction=2"], "--set train_fraction=2.0: must be in (0, 1]"),
        (["--max-length", "0"], "--max-length 0: must be >= 3"),
        (["--max-length", "100"], "has 64 positions; pass --max-length 64 or less"),
        (["--encoder-lr", "-1"], "--encoder-lr -1.0: must be >= 0"),
        (["--set", "epochs=abc", "--epochs", "2"], "--set epochs=abc"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
        (["--precision", "half"], "--precision half: must be one of auto, fp32, bf16, fp16"),
        (["--grad-accum", "0"], "--grad-accum 0: must be >= 1"),
        (["--labels", "B-PER"], "give types, e.g. --labels PER,LOC,EVENT"),
        (["--model", "vcrmner", "--set", "num_heads=5"], "--set num_heads=5: the text encoder's width 32"),
        (["--model", "vcrmner", "--set", "max_objects=0"], "--set max_objects=0: must be >= 1"),
        (["--model", "promptmner", "--set", "prompts=foo"], "unknown prompts='foo'; valid values: task, kb"),
    ],
)
def test_bad_options_are_one_line_errors_before_training(args, expected, data, tiny_bert, tmp_path, capsys):
    code, err = run(args, data, tiny_bert, tmp_path / "r", capsys)
    assert code == 2 and expected in err, err
    assert err.count("\n") == 1 and err.startswith("mner-train: error: ")  # one line, no traceback
    assert not (tmp_path / "r").exists()


def test_encoder_names_that_cannot_load_say_how_to_pass_a_folder(data, tiny_bert, tmp_path, capsys):
    misspelt = tiny_bert.parent / (tiny_bert.name[:-1] + "x")
    code, err = run(["--text-encoder", str(misspelt)], data, tiny_bert, tmp_path / "r", capsys)
    assert code == 2 and "no such folder" in err and f"did you mean {tiny_bert}" in err
    code, err = run(["--text-encoder", "./tiny-bret"], data, tiny_bert, tmp_path / "r", capsys)
    assert code == 2 and "no such folder" in err and err.count("\n") == 1
    # the default hub name without network (tests run with HF_HUB_OFFLINE=1)
    code, err = run(["--text-encoder", "bert-base-cased"], data, tiny_bert, tmp_path / "r", capsys)
    assert code == 2 and "pass a local folder" in err and "--local-dir" in err and err.count("\n") == 1


def test_a_shape_problem_on_a_test_post_surfaces_before_epoch_1(data, tiny_bert, tmp_path, capsys):
    from mner.trainer.models import MODEL_REGISTRY, register_model
    from mner.trainer.models.bert_crf import BertCRF

    if "test_short_only_crf" not in MODEL_REGISTRY:
        class ShortOnly(BertCRF):
            def word_emissions(self, batch):
                if batch["input_ids"].shape[1] > 20:  # stands in for a fixed-size buffer
                    raise RuntimeError("The expanded size of the tensor (20) must match the existing size")
                return super().word_emissions(batch)

        register_model("test_short_only_crf")(ShortOnly)
    code, err = run(["--model", "test_short_only_crf", "--epochs", "3"], data, tiny_bert, tmp_path / "r", capsys)
    assert code == 2 and "test: the model fails on the split's longest post" in err and "test.txt:" in err
    assert "epoch 1" not in err and not (tmp_path / "r").exists()


def test_labels_come_from_the_training_split(data, tiny_bert, tmp_path, capsys):
    out = tmp_path / "r"
    code, err = run(["--epochs", "1", "--batch-size", "16"], data, tiny_bert, out, capsys)
    assert code == 0, err
    assert "test: entity types the model was not trained on: EVENT (2 entities)" in err
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert "B-EVENT" not in labels and "B-PER" in labels
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unseen_types"] == {"test": {"EVENT": 2}}
    assert metrics["test"]["per_type"]["EVENT"]["gold"] == 2 and metrics["test"]["per_type"]["EVENT"]["correct"] == 0
    assert metrics["test"]["micro"]["gold"] == 4 + 2 + 80  # unseen types stay in the denominator

    # evaluate on other data with an unseen type says so, and records it
    other = tmp_path / "other"
    other.mkdir()
    write_split(other / "test.txt", [[("rt", "O"), ("game", "B-PRODUCT")]])
    assert main(["evaluate", str(out), "--data", str(other), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "PRODUCT (1 entities)" in err
    (result,) = (out / "eval").glob("test-*.json")
    assert json.loads(result.read_text())["unseen_types"] == {"PRODUCT": 1}

    # --labels adds types the training split lacks
    code, err = run(["--epochs", "1", "--labels", "EVENT", "--overwrite"], data, tiny_bert, out, capsys)
    assert code == 0 and "B-EVENT" in json.loads((out / "labels.json").read_text())["labels"]
    assert json.loads((out / "metrics.json").read_text())["unseen_types"] == {}


def test_types_differing_only_by_case_are_an_error(tmp_path, tiny_bert, capsys):
    rng = random.Random(3)
    folder = tmp_path / "data"
    folder.mkdir()
    write_split(folder / "train.txt", [make_post(rng, "1") for _ in range(4)])
    write_split(folder / "valid.txt", [[("john", "B-per")]])
    code, err = run([], folder, tiny_bert, tmp_path / "r", capsys)
    assert code == 2 and "'PER'" in err and "'per'" in err and "valid.txt:" in err and "differ only by case" in err


def test_every_model_owns_its_parameter_groups(tiny_bert):
    import torch

    from mner.trainer.core.config import TrainConfig
    from mner.trainer.models import (
        MODEL_REGISTRY,
        available_models,
        check_parameter_groups,
        default_parameter_groups,
    )
    from mner.trainer.models.bert_crf import BertCRF

    for name in available_models():
        assert callable(getattr(MODEL_REGISTRY[name], "parameter_groups", None)), name
    config = TrainConfig(encoder_lr=1e-5, head_lr=1e-3, crf_lr=1e-2, weight_decay=0.1)
    model = BertCRF(BertCRF.Config(), labels=["O", "B-PER", "I-PER"], text_encoder=str(tiny_bert))
    groups = {g["name"]: g for g in model.parameter_groups(config)}
    assert groups["text_encoder"]["lr"] == 1e-5 and groups["text_encoder/no_decay"]["weight_decay"] == 0.0
    assert groups["head"]["lr"] == 1e-3 and groups["crf"]["lr"] == 1e-2 and groups["head"]["weight_decay"] == 0.1
    check_parameter_groups(model, list(groups.values()))

    # a model with its own tower (the next model's fine-tuned CLIP vision encoder) adds a group at its rate
    model.vision_tower = torch.nn.Linear(4, 4)
    tower = [g for g in default_parameter_groups(model, config, extra_rates={"vision_tower": 3e-6})
             if g["name"].startswith("vision_tower")]
    assert {g["name"] for g in tower} == {"vision_tower", "vision_tower/no_decay"} and tower[0]["lr"] == 3e-6
    with pytest.raises(ValueError, match="leaves out trainable parameters"):
        check_parameter_groups(model, list(groups.values()))  # the tower's parameters are in no group
