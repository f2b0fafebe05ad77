"""mner: multimodal named entity recognition with a cached visual stage.

The code lives in three sub-packages mapped from the repository's top-level folders:
``mner.pipeline`` (data reader and the HDF5 feature-cache schema, shared by both stages),
``mner.features`` (stage 1, ``mner-features``) and ``mner.trainer`` (stage 2, ``mner-train``).
"""

__version__ = "0.1.0"
