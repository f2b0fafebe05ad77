"""Tagging new posts with a trained run: the :class:`Tagger` API, entity scores, output writers, and the
trainer's one narrow door to stage 1 (``stage1.py``) for images no cache holds."""

from mner.trainer.inference.tagger import TaggedEntity, TaggedPost, Tagger

__all__ = ["TaggedEntity", "TaggedPost", "Tagger"]
