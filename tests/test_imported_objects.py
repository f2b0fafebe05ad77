"""A user's own candidate boxes (JSON or NPZ keyed by image id): read, checked, sorted by score, hashed;
every problem names the file, the image and the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mner.features.producers.imported_objects import load_objects_file
from mner.pipeline.data import DataFormatError


def test_json_and_npz_read_the_same_objects(tmp_path):
    entries = {
        "71044": {"boxes": [[0, 0, 10, 10], [5, 5, 20, 30]], "scores": [0.2, 0.9], "class_names": ["man", "hat"],
                  "features": [[1, 0, 0], [0, 1, 0]]},
        "O_2371": {"boxes": [], "scores": [], "class_names": [], "features": []},
        "elsewhere": {"boxes": [[0, 0, 1, 1]], "scores": [1.0]},
    }
    (tmp_path / "c.json").write_text(json.dumps(entries), encoding="utf-8")
    arrays = {f"{k}/{f}": np.asarray(v[f], dtype=np.str_ if f == "class_names" else np.float32)
              for k, v in entries.items() for f in v}
    arrays["O_2371/boxes"] = np.zeros((0, 4), np.float32)
    arrays["O_2371/features"] = np.zeros((0, 3), np.float32)
    np.savez(tmp_path / "c.npz", **arrays)
    for name in ("c.json", "c.npz"):
        loaded = load_objects_file(tmp_path / name, ["71044", "O_2371", "99"])
        assert loaded.unknown_ids == ["elsewhere"] and loaded.sha256.startswith("sha256:")
        assert loaded.boxes["71044"].tolist() == [[5, 5, 20, 30], [0, 0, 10, 10]]  # descending score
        assert loaded.scores["71044"].tolist() == pytest.approx([0.9, 0.2])
        assert loaded.class_names["71044"] == ["hat", "man"]
        assert loaded.features["71044"].tolist() == [[0, 1, 0], [1, 0, 0]] and loaded.feature_width == 3
        assert loaded.boxes["O_2371"].shape == (0, 4) and loaded.features["O_2371"].shape == (0, 3)


@pytest.mark.parametrize("entry,message", [
    ({"boxes": [[0, 0, 10, 10]]}, "needs boxes and scores"),
    ({"boxes": [[0, 0, 10, 10]], "scores": [0.5, 0.4]}, "1 boxes but 2 scores"),
    ({"boxes": [[10, 0, 5, 10]], "scores": [0.5]}, "box 0 [10.0, 0.0, 5.0, 10.0] is empty"),
    ({"boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": ["x"]}, "unknown fields ['labels']"),
    ({"boxes": [[0, 0, 10, 10]], "scores": [0.5], "features": [[1, 2], [3, 4]]}, "features of shape (2, 2)"),
])
def test_problems_name_the_file_and_the_image(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"71044": entry}), encoding="utf-8")
    with pytest.raises(DataFormatError, match="71044") as err:
        load_objects_file(path, ["71044"])
    assert str(err.value).startswith(str(path)) and message in str(err.value)
