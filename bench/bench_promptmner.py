"""Step time of PromptMNER variants next to bert_crf on the same real Twitter-2015 batches.

Answers where PromptMNER's training step goes (docs/models/README.md records the figures): the clue
tokens (how many, and whether posts without a usable image carry them), modality-aware attention,
and -- with ``--other-code`` -- another implementation of the model file, e.g. an older commit's:

    git show beb0ed6:trainer/models/promptmner.py > /tmp/promptmner_old.py
    python bench/bench_promptmner.py --cache CACHE.h5 --other-code /tmp/promptmner_old.py \\
        "old 100 clues:code=other" "100 clues" "no usable image:placeholders=0" \\
        "30 clues:num_continuous_prompts=30" "task labels:prompts=task" "w/o MAS:use_mas=False"

A variant is ``NAME[:key=value,...]``: model Config fields, plus ``code=other`` (use --other-code's
class) and ``placeholders=0`` (mask placeholder images like missing ones, the trainer's default;
1 feeds their stand-in features, so every post carries clue tokens). Every variant trains on the same
batches; the variants take turns within each step, so load changes hit all alike; medians are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from mner.pipeline.cache import FeatureCache
from mner.pipeline.data import load_dataset
from mner.trainer.core.config import convert_value
from mner.trainer.inputs.batching import Collator, PostDataset
from mner.trainer.inputs.text_encoder import load_tokenizer
from mner.trainer.inputs.visual import VisualBatcher
from mner.trainer.models import MODEL_REGISTRY, get_model_class


def load_other_class(path: str):
    """The PromptMNER class of another model file, registered under another name."""
    get_model_class("promptmner")  # the current one registers first
    current = MODEL_REGISTRY.pop("promptmner")
    spec = importlib.util.spec_from_file_location("promptmner_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["promptmner_other"] = module
    spec.loader.exec_module(module)
    MODEL_REGISTRY["promptmner"] = current
    return module.PromptMNER


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in rest.split(",") if pair)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help='e.g. "100 clues" "30 clues:num_continuous_prompts=30"')
    parser.add_argument("--data", default="../shared/data/twitter2015")
    parser.add_argument("--cache", required=True, help="feature cache over the data's image ids")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--other-code", default=None, help="another promptmner.py (variants with code=other)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    tokenizer = load_tokenizer(args.text_encoder)
    posts = dataset.splits["train"][: args.batch_size * args.steps]
    cache = FeatureCache(args.cache)
    label_to_id = {label: i for i, label in enumerate(dataset.labels)}
    aligned = PostDataset(posts, tokenizer, label_to_id=label_to_id, max_length=128,
                          image_rows=[cache.row_of(p.image_id) for p in posts], repair=True)
    classes = {"current": get_model_class("promptmner")}
    if args.other_code:
        classes["other"] = load_other_class(args.other_code)

    def batches(paths: list[str], placeholders: bool) -> list[dict]:
        batcher = VisualBatcher(cache, paths, use_placeholders=placeholders) if paths else None
        collate = Collator(pad_token_id=tokenizer.pad_token_id, visual_batcher=batcher)
        size = args.batch_size
        return [collate([aligned[i] for i in range(s * size, (s + 1) * size)]) for s in range(args.steps)]

    runs = {}
    text_model = get_model_class("bert_crf")
    runs["bert_crf"] = (text_model(text_model.Config(), labels=dataset.labels, text_encoder=args.text_encoder),
                        batches([], False))
    for text in args.variants:
        name, options = parse_variant(text)
        cls = classes[options.pop("code", "current")]
        placeholders = options.pop("placeholders", "1") == "1"
        config = cls.Config(**{k: convert_value(cls.Config, k, v) for k, v in options.items()})
        paths = cls.required_features(config)
        model = cls(config, labels=dataset.labels, text_encoder=args.text_encoder, tokenizer=tokenizer,
                    features=cache.feature_spec(paths))
        runs[name] = (model, batches(paths, placeholders))

    optimisers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, (model, _) in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps):
        for name, (model, model_batches) in runs.items():
            model.train()
            start = time.perf_counter()
            loss = model(model_batches[step])["loss"]
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["bert_crf"][1:])
    print("| variant | median step ms | x bert_crf |\n|---|---|---|")
    for name, times in seconds.items():
        median = statistics.median(times[1:])  # the first step warms up
        print(f"| {name} | {1000 * median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
