"""Stage 1: run detectors and image encoders once and write the HDF5 feature cache."""
