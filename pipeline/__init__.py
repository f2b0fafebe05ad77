"""Shared by both stages: the dataset reader and the HDF5 feature-cache schema."""
