"""``mner-train predict``: posts from a data file -> the :class:`Tagger` -> JSONL / CoNLL / Parquet (+ error table).

The same code path as the Python API: :meth:`Tagger.tag_posts`. ``<out>.json`` beside the output
records the run, the data, the caches read (and the side cache stage 1 filled), how many posts had
an ok / missing / unreadable / uncached image or none, how scores are defined, and any warning.
"""

from __future__ import annotations

import json
from pathlib import Path

from mner.trainer.inference.outputs import WRITERS, output_format, record_path, write_error_table, write_text_atomic


def predict_run(
    run_dir: str | Path,
    *,
    data: str | Path,
    out: str | Path | None = None,
    features: str | Path | None = None,
    images: str | Path | None = None,
    side_cache: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    allow_missing_images: bool = False,
    stage1_weights: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Tag every post of ``data`` (tags optional). With ``images``, images no cache holds are extracted
    first into the side cache with the run's own stage-1 record. An existing ``out`` is replaced only
    with ``overwrite`` and only when its record says mner wrote it; an input is never written over
    (pipeline/outputs.py). Returns the output path."""
    from mner.pipeline.data import load_dataset
    from mner.pipeline.outputs import PREDICTIONS_RECORD_KEY, check_output
    from mner.trainer.core.console import log
    from mner.trainer.core.run_folder import require_finished
    from mner.trainer.core.run_record import check_coverage
    from mner.trainer.evaluation.decode import DECODE_PRECISION
    from mner.trainer.evaluation.evaluate import _announce, choose_cache, entity_scores
    from mner.trainer.inference.tagger import Tagger
    from mner.trainer.inputs.posts import SPLITS

    run_dir = Path(run_dir)
    require_finished(run_dir)
    run_config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    out = Path(out) if out is not None else run_dir / "predictions" / f"predict-{Path(data).name}.conll"
    dataset = load_dataset(data, require_tags=False)
    inputs = [data, *dataset.files.values(), *(p for p in (features, side_cache) if p is not None)]
    check_output(out, kind="predictions", overwrite=overwrite, inputs=inputs, create_folder=True)
    fmt = output_format(out)
    posts = [post for split in SPLITS for post in dataset.splits.get(split, [])]
    # which cache, and warnings about it; with --images the coverage is checked after stage 1 added the rest
    _, cache, warnings = choose_cache(run_dir, run_config, features=features, data=data, posts=posts,
                                      allow_missing_images=allow_missing_images or images is not None)
    _announce(cache, warnings)
    tagger = Tagger.from_run(run_dir, device=device, batch_size=batch_size, features=features,
                             side_cache=side_cache, progress=True, stage1_weights=stage1_weights)
    tagged = tagger.tag_posts(posts, images_dir=images)
    report = tagger.last_report
    if images is not None and cache is not None:
        counts = {"not_in_cache": report.image_status.get("not_in_cache", 0), "total": len(posts)}
        max_share = 1.0 if allow_missing_images else run_config["train_config"].get("max_missing_images", 0.05)
        check_coverage({"predict": counts}, cache_path=str(report.side_cache), max_share=max_share,
                       what="predict --images")
    record = {
        PREDICTIONS_RECORD_KEY: 1, "run": str(run_dir.resolve()), "data": str(Path(data).resolve()),
        "data_hash": dataset.data_hash,
        "posts": len(posts), "format": fmt, "image_status": report.image_status,
        "images": str(Path(images).resolve()) if images is not None else None,
        "extracted_images": report.extracted, "side_cache": report.side_cache,
        "score": tagger.score_kind, "decode_precision": DECODE_PRECISION, "seconds": report.seconds,
        "cache": cache, "warnings": warnings, "files": {},
    }
    # the record first: an output that exists always has the record that lets a rerun --overwrite it
    write_text_atomic(record_path(out), json.dumps(record, indent=2) + "\n")
    WRITERS[fmt](out, tagged)
    if all(post.gold is not None for post in tagged) and tagged:
        record["scores"] = entity_scores([post.gold for post in tagged], [post.tags for post in tagged])
        record["files"] = write_error_table(out.with_suffix(""), tagged)
        write_text_atomic(record_path(out), json.dumps(record, indent=2) + "\n")
    status = ", ".join(f"{k} {v}" for k, v in sorted(report.image_status.items()))
    log(f"{len(posts)} posts tagged -> {out} (images: {status}; {report.extracted} extracted)")
    return out
