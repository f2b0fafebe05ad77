"""The training core: configuration, the run folder and its record, the engine and the training loop."""
