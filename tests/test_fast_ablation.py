"""Fast ablation mode: the frozen text encoder runs once per distinct post, heads train alone."""

from __future__ import annotations

import json

import pytest
import torch
from experiment_helpers import write_dataset

from mner.trainer.cli import main
from mner.trainer.core.config import ConfigError


def test_cached_encoder_gives_the_frozen_encoders_outputs_without_running_it(tiny_bert, tmp_path):
    from mner.pipeline.data import load_dataset
    from mner.trainer.core.fast_text import use_cached_text_encoder
    from mner.trainer.inputs.batching import Collator, PostDataset
    from mner.trainer.inputs.text_encoder import load_tokenizer
    from mner.trainer.models import get_model_class

    dataset = load_dataset(write_dataset(tmp_path / "d", seed=4, sizes=(10, 4, 4)))
    tokenizer = load_tokenizer(str(tiny_bert))
    labels = dataset.labels
    label_to_id = {label: i for i, label in enumerate(labels)}
    sets = {s: PostDataset(dataset.splits[s], tokenizer, label_to_id=label_to_id, max_length=24)
            for s in ("train", "dev", "test")}
    cls = get_model_class("bert_crf")
    torch.manual_seed(0)
    model = cls(cls.Config(dropout=0.0), labels=labels, text_encoder=str(tiny_bert))
    reference = cls(cls.Config(dropout=0.0), labels=labels, text_encoder=str(tiny_bert))
    reference.load_state_dict(model.state_dict())
    reference.eval()
    from mner.trainer.core import fast_text

    fast_text._SHARED_TABLES.clear()
    encoded = use_cached_text_encoder(model, list(sets.values()), device=torch.device("cpu"), batch_size=4)
    assert encoded == len({tuple(a.input_ids) for s in sets.values() for a in s.aligned})
    again = cls(cls.Config(dropout=0.0), labels=labels, text_encoder=str(tiny_bert))
    assert use_cached_text_encoder(again, list(sets.values()), device=torch.device("cpu")) == 0  # shared in-process
    assert not any(p.requires_grad for p in model.text_encoder.parameters())

    def must_not_run(*args, **kwargs):
        raise AssertionError("the encoder ran after its outputs were cached")

    model.text_encoder.embeddings.forward = must_not_run
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([sets["train"][i] for i in range(6)])
    model.train()  # train mode: the cached outputs are the eval-mode (dropout-free) encoder's
    torch.testing.assert_close(model.word_emissions(batch), reference.word_emissions(batch))
    loss = model(batch)["loss"]
    loss.backward()
    assert model.emissions.weight.grad is not None


def test_fast_ablation_run_keeps_the_encoder_pretrained_and_is_recorded(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    data = write_dataset(tmp_path / "d", seed=5, sizes=(16, 4, 4))
    out = tmp_path / "run"
    assert main(["--data", str(data), "--model", "bert_crf", "--text-encoder", str(tiny_bert), "--epochs", "2",
                 "--batch-size", "8", "--max-length", "32", "--device", "cpu", "--out", str(out),
                 "--set", "fast_ablation=true"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["fast_ablation"] is True
    saved = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_bert / "model.safetensors"))
    name = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(saved[f"text_encoder.{name}"], original[name])  # never trained
    from mner.trainer.experiments.report import FAST_FLAG, load_run

    assert FAST_FLAG in load_run(out, min_coverage=0.9).flags  # marked in every report row


def test_models_that_feed_prompts_through_the_encoder_are_refused(tiny_bert):
    from mner.trainer.core.fast_text import use_cached_text_encoder

    class PromptModel(torch.nn.Module):
        model_name = "promptmner"

        def __init__(self):
            super().__init__()
            self.text_encoder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList()})

    with pytest.raises(ConfigError, match="cannot be cached"):
        use_cached_text_encoder(PromptModel(), [], device=torch.device("cpu"))
