"""How much PromptMNER's clue tokens change the words of posts whose image carries nothing.

For real Twitter-2015 posts whose image is missing or a placeholder (``images/ok`` False), compares
the word states of a freshly built PromptMNER (pretrained encoder, no training) with the plain text
encoder's: the share of each layer's attention that the words spend on clue tokens, and the cosine
between the last-layer word states. A model whose image-less posts see no clue tokens gives 0% and 1.0.
``--other-code`` runs another implementation of the model file next to the current one, e.g.:

    git show beb0ed6:trainer/models/promptmner.py > /tmp/promptmner_old.py
    python bench/diagnose_promptmner_clues.py --cache CACHE.h5 --other-code /tmp/promptmner_old.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_promptmner import load_other_class

from mner.pipeline.cache import FeatureCache
from mner.pipeline.data import load_dataset
from mner.trainer.inputs.batching import Collator, PostDataset
from mner.trainer.inputs.text_encoder import load_encoder, load_tokenizer
from mner.trainer.inputs.visual import VisualBatcher
from mner.trainer.models import get_model_class
from mner.trainer.models.layers import gather_first_pieces


def clue_attention_share(model, batch: dict) -> list[float]:
    """Per layer: mean attention mass that kept words put on clue columns (eval mode, no dropout)."""
    shares: list[float] = []
    hooks = []
    for layer in model.text_encoder["layers"]:
        def spy(module, args, output, store=shares):
            x, attention_mask, is_visual = args
            keys = module.split_heads(module.key(x))  # (B, h, S, d)
            queries = module.split_heads(module.queries["w2w" if module.use_mas else "shared"](x))
            clue_keys = module.queries["w2v"](x) if module.use_mas else None
            scores = queries @ keys.transpose(-1, -2) / keys.size(-1) ** 0.5  # (B, h, S, S)
            if clue_keys is not None:  # text queries use Q_w2v on clue keys
                scores = torch.where(is_visual[:, None, None, :],
                                     module.split_heads(clue_keys) @ keys.transpose(-1, -2) / keys.size(-1) ** 0.5,
                                     scores)
            scores = scores.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
            weights = scores.softmax(-1)  # (B, h, S, S)
            text_rows = ~is_visual[0]
            on_clues = weights[:, :, text_rows][..., is_visual[0]].sum(-1)  # (B, h, N_t)
            real = attention_mask[:, text_rows][:, None, :].float()  # (B, 1, N_t)
            store.append(float((on_clues * real).sum() / (real.sum() * weights.size(1))))
        hooks.append(layer.register_forward_hook(spy))
    with torch.no_grad():
        model.word_states(batch)
    for hook in hooks:
        hook.remove()
    return shares


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/twitter2015")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--other-code", default=None)
    parser.add_argument("--posts", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dataset = load_dataset(args.data)
    tokenizer = load_tokenizer(args.text_encoder)
    cache = FeatureCache(args.cache)
    posts = dataset.splits["train"][: args.posts]
    aligned = PostDataset(posts, tokenizer, label_to_id={label: i for i, label in enumerate(dataset.labels)},
                          max_length=128, image_rows=[cache.row_of(p.image_id) for p in posts])
    implementations = {"current": get_model_class("promptmner")}
    if args.other_code:
        implementations["other"] = load_other_class(args.other_code)
    encoder = load_encoder(args.text_encoder).eval()
    print("| code | image-less posts in batch | clue attention share per layer | cos(word states, text encoder) |")
    print("|---|---|---|---|")
    for name, cls in implementations.items():
        config = cls.Config()
        paths = cls.required_features(config)
        model = cls(config, labels=dataset.labels, text_encoder=args.text_encoder, tokenizer=tokenizer,
                    features=cache.feature_spec(paths)).eval()
        collate = Collator(pad_token_id=tokenizer.pad_token_id, visual_batcher=VisualBatcher(cache, paths))
        batch = collate([aligned[i] for i in range(len(posts))])
        no_image = int((~batch["visual"]["images/ok"]).sum())
        shares = clue_attention_share(model, batch)
        with torch.no_grad():
            words = model.word_states(batch)  # (B, W, H)
            text = gather_first_pieces(encoder(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).last_hidden_state,
                                       batch["word_index"])
        keep = batch["word_mask"]
        cosine = F.cosine_similarity(words[keep], text[keep], dim=-1).mean()
        print(f"| {name} | {no_image}/{len(posts)} | {', '.join(f'{100 * s:.0f}%' for s in shares)} | {cosine:.3f} |")


if __name__ == "__main__":
    main()
