"""Helpers shared by several test modules: generated data, tiny caches and model batches (tests import
helpers from here or from conftest, never from each other)."""
