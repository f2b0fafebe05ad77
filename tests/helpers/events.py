"""TensorBoard event files read back (the tracking tests)."""

from __future__ import annotations

from pathlib import Path


def scalar_events(folder: Path) -> list[tuple[str, int, float]]:
    """Every scalar (tag, step, value) in every event file under ``folder``, duplicates included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars" or value.HasField("simple_value"):
                    number = value.simple_value if value.HasField("simple_value") else \
                        float(tensor_util.make_ndarray(value.tensor))
                    events.append((value.tag, event.step, number))
    return events
