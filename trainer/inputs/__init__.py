"""What a model reads: the text encoder and tokenizer, word alignment, and the text and visual batches."""
