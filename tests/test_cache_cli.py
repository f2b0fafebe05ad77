"""Issue 7 points 5 and 9: `info` is quick and strict, merge refuses an incomplete shard set, and the
schema doc / missing-features hints agree with the specs and the stage-1 command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from helpers.cache import IDS, _shard_ids, write_cache

from mner.features.cli import app, main
from mner.pipeline.cache import (
    CacheError,
    FeatureCache,
    all_groups,
    describe,
    extract_command_hint,
    merge_caches,
)
from mner.pipeline.cache.docgen import BEGIN, END, generated_block
from mner.pipeline.cache.tiny import write_tiny_cache

ROOT = Path(__file__).resolve().parents[1]


def test_info_imports_no_torch_and_describes(tmp_path):
    path = tmp_path / "c.h5"
    write_tiny_cache(path, ["encoders/clip"], status=["ok", "ok", "missing", "ok", "placeholder", "ok"])
    code = (
        "import sys; from mner.features.cli import main; code = main(['info', sys.argv[1]]); "
        "print('torch imported:', 'torch' in sys.modules); sys.exit(code)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch imported: False" in run.stdout
    assert "images: 6 (ok 4, missing 1, unreadable 0, placeholder 1)" in run.stdout
    assert "/encoders/clip   fingerprint" in run.stdout and "matches its spec" in run.stdout


def test_info_exits_nonzero_on_files_that_are_not_mner_caches(tmp_path, capsys):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = [1, 2, 3]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["info", str(other)]) == 1
    assert "not an mner feature cache" in capsys.readouterr().err
    assert main(["info", str(text)]) == 1
    assert main(["info", str(tmp_path / "absent.h5")]) == 1


def test_merge_refuses_an_incomplete_shard_set(tmp_path, capsys):
    paths = []
    for i, ids in enumerate(_shard_ids(3)):
        paths.append(tmp_path / f"s{i}.h5")
        write_cache(paths[-1], ids, IDS, shard=(i, 3))
    out = tmp_path / "merged.h5"
    assert main(["merge", str(paths[0]), str(paths[2]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "missing shard(s) 1/3" in err and "--allow-partial" in err and not out.exists()
    other = tmp_path / "other.h5"  # shard 1/3 cut from another id list
    write_cache(other, _shard_ids(3)[1], IDS[:-1], shard=(1, 3))
    with pytest.raises(CacheError, match="different image lists"):
        merge_caches([paths[0], other, paths[2]], out)
    assert main(["merge", str(paths[0]), str(paths[2]), "--out", str(out), "--allow-partial"]) == 0
    merged = FeatureCache(out)
    assert merged.provenance("encoders/clip")["merge"]["missing"] and "PARTIAL" in describe(out)
    assert main(["merge", *map(str, paths), "--out", str(tmp_path / "full.h5")]) == 0  # the complete set


def test_schema_doc_tables_are_generated_from_the_specs():
    doc = (ROOT / "docs" / "cache-schema.md").read_text(encoding="utf-8")
    block = doc[doc.index(BEGIN) : doc.index(END) + len(END)]
    assert block == generated_block(), (
        "run: python -m mner.pipeline.cache.docgen --write docs/cache-schema.md"
    )
    assert "50x768 f16 |" not in doc.replace("(50x768 f16; real caches hold 49x768)", "")
    assert "`images/ok`" in doc and "not datasets" in doc


def test_hints_name_only_options_that_mner_features_extract_has():
    import typer.main

    extract = typer.main.get_command(app).commands["extract"]
    flags = {flag for param in extract.params for flag in param.opts}
    for group in all_groups():
        if group.option:
            assert group.option.split()[0] in flags, f"{group.name}: {group.option} is no extract option"
    hint = extract_command_hint(["prompts/my_file/crop_weights", "encoders/swin/grid", "objects/offsets"])
    assert "--prompts my_file" in hint and "--encoder swin" in hint and "--detector maskrcnn" in hint
    # the groups of issue 10 name their own flags (which the loop above checked exist)
    assert "--grounding owlv2" in extract_command_hint(["grounding/pixels"])
    assert "--grounding-clip" in extract_command_hint(["encoders/clip_grounding/states"])
    assert "--captions blip" in extract_command_hint(["captions/text"])
