"""mner-train checks the cache's provenance against the stage-1 settings the model's paper assumes,
and the missing-features hint carries those settings (issue 9, item 6)."""

from __future__ import annotations

import json

from mner.trainer.cli import main


def register_clip_model():
    """A bert_crf reading the CLIP image embedding whose paper wants a ResNet CLIP."""
    from mner.trainer.models import MODEL_REGISTRY, register_model
    from mner.trainer.models.bert_crf import BertCRF
    from mner.trainer.models.stage1 import Stage1Setting

    if "test_rn_clip_crf" in MODEL_REGISTRY:
        return
    register_model("test_rn_clip_crf")(type("RNClipCRF", (BertCRF,), {
        "required_features": staticmethod(lambda config: ["encoders/clip/image_embed"]),
        "stage1_settings": staticmethod(lambda config: [Stage1Setting(
            "encoders/clip", "model", r"open_clip/RN\w*", "--clip-model RN50", "a test paper", match="pattern")]),
    }))


def test_cache_from_other_stage1_settings_is_refused_unless_overridden(
    tiny_cache,
    tiny_bert,
    tmp_path,
    capsys,
):
    register_clip_model()
    args = ["--features", str(tiny_cache), "--model", "test_rn_clip_crf", "--text-encoder", str(tiny_bert),
            "--epochs", "1", "--batch-size", "16", "--max-length", "24", "--device", "cpu", "--allow-missing-images"]
    code = main([*args, "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "encoders/clip model matching open_clip/RN" in err and "'ViT-B-32'" in err  # what and what was found
    assert "--clip-model RN50" in err and "mner-features extract" in err  # how to fix it
    assert "stage1_mismatch=warn" in err  # how to go on anyway
    assert not (tmp_path / "refused").exists()

    code = main([*args, "--set", "stage1_mismatch=warn", "--out", str(tmp_path / "warned")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "stage-1 settings differ" in err
    recorded = json.loads((tmp_path / "warned" / "metrics.json").read_text())["stage1_mismatches"]
    assert len(recorded) == 1 and "RN50" in recorded[0]
    config = json.loads((tmp_path / "warned" / "config.json").read_text())
    assert config["features"]["stage1_mismatches"] == recorded

    code = main([*args, "--set", "stage1_mismatch=maybe", "--out", str(tmp_path / "bad")])
    assert code == 2 and "valid values: error, warn" in capsys.readouterr().err


def test_missing_features_hint_carries_the_papers_stage1_settings(
    tiny_cache,
    tiny_data,
    tiny_bert,
    tmp_path,
    capsys,
):
    code = main(["--features", str(tiny_cache), "--model", "pmner", "--text-encoder", str(tiny_bert),
                 "--max-length", "24", "--set", "num_heads=2", "--out", str(tmp_path / "r")])
    err = "\n".join(capsys.readouterr())  # the error goes to stderr, the hint may follow on stdout
    assert code == 2 and "Traceback" not in err
    command = next(line for line in err.splitlines() if "mner-features extract" in line)
    for flag in ("--detector fasterrcnn", "--score-threshold 0.95", "--top-k 5", "--encoder resnet152"):
        assert flag in command, command
    assert "maskrcnn" not in command
    # no cache at all: the command to build one names VCRMNER's detector and CLIP
    code = main(["--data", str(tiny_data), "--model", "vcrmner", "--text-encoder", str(tiny_bert),
                 "--max-length", "24", "--set", "num_heads=2", "--out", str(tmp_path / "r2")])
    err = "\n".join(capsys.readouterr())
    assert code == 2 and "--detector maskrcnn" in err and "--clip-model ViT-B-16" in err
