"""mner: multimodal named entity recognition with a cached visual stage.

The code lives in three sub-packages mapped from the repository's top-level folders:
``mner.pipeline`` (data reader and the HDF5 feature-cache schema, shared by both stages),
``mner.features`` (stage 1, ``mner-features``) and ``mner.trainer`` (stage 2, ``mner-train``).

``mner.Tagger`` tags new posts with a trained run (``mner.Tagger.from_run("runs/t15-vcrmner")``);
it is imported on first use, so ``import mner`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Tagger", "TaggedPost", "TaggedEntity"):
        from mner.trainer import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'mner' has no attribute {name!r}")
