"""Grounded MNER (``--boxes``): gold boxes, candidates, the grounding head, metrics (docs/gmner.md)."""
