"""Stage 2: train and evaluate text-only and fusion NER models from cached features."""
