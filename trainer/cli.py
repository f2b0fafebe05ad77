"""``mner-train``: train (default command), evaluate and predict. Functions here only parse arguments."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Train and evaluate MNER models from a feature cache (stage 2).\n\n"
        "Example: mner-train --data data/twitter2015 --model bert_crf --text-encoder minilm-l6 "
        "--epochs 4 --out runs/t15-bert-crf"
    ),
)
SUBCOMMANDS = ("train", "evaluate", "predict", "sweep", "tune", "report", "show")
# recent typer releases parse with their own copy of click, whose usage errors derive from typer.TyperException
# extract flags a local copy of a stage-1 file can be given with (mner.features.run.record.LOCAL_COPY_FLAGS:
# the trainer never imports stage 1, a test checks that the lists agree)
STAGE1_COPY_FLAGS = ("detector-weights", "resnet-weights", "clip-pretrained", "swin-model", "grounding-map",
                     "grounding-crops-dir", "captions", "grounding-model", "grounding-clip-model", "caption-model")
USAGE_ERROR = getattr(typer, "TyperException", click.exceptions.ClickException)


@app.command("train")
def train_command(
    data: Path | None = typer.Option(
        None, help="Folder with train.txt/valid.txt/test.txt (or one file). Overrides the posts stored in "
        "--features. Example: --data data/twitter2015"),
    features: Path | None = typer.Option(
        None, help="HDF5 feature cache from mner-features; its stored posts are used when --data is absent. "
        "Example: --features cache/t15.h5"),
    model: str | None = typer.Option(None, help="Registered model name (default bert_crf). Example: --model vcrmner"),
    text_encoder: str | None = typer.Option(
        None, help="Hugging Face hub name, local folder or alias (minilm-l6). Example: --text-encoder roberta-base"),
    out: Path | None = typer.Option(
        None, help="Run directory to create (default runs/<model>-<data>-s<seed>). Example: --out runs/t15-crf"),
    preset: str | None = typer.Option(None, help="Named setting of the model (paper rows). Example: --preset default"),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a model or train config field; repeatable. Example: --set dropout=0.2"),
    epochs: int | None = typer.Option(None, help="Maximum epochs. Example: --epochs 4"),
    batch_size: int | None = typer.Option(None, help="Posts per step. Example: --batch-size 16"),
    max_length: int | None = typer.Option(None, help="Sub-word pieces per post. Example: --max-length 128"),
    encoder_lr: float | None = typer.Option(None, help="Text encoder learning rate. Example: --encoder-lr 5e-5"),
    head_lr: float | None = typer.Option(None, help="Head/fusion learning rate. Example: --head-lr 1e-3"),
    crf_lr: float | None = typer.Option(None, help="CRF learning rate. Example: --crf-lr 1e-2"),
    patience: int | None = typer.Option(None, help="Early-stopping patience in epochs (0: off). Example: --patience 3"),
    seed: int | None = typer.Option(None, help="Random seed. Example: --seed 1"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N. Example: --device cpu"),
    num_workers: int | None = typer.Option(None, help="DataLoader workers. Example: --num-workers 2"),
    precision: str | None = typer.Option(
        None, help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA only). Example: --precision fp32"),
    grad_accum: int | None = typer.Option(
        None, help="Batches per optimiser step (gradient accumulation). Example: --grad-accum 4"),
    labels: str | None = typer.Option(
        None, help="Entity types to add to those of the training split. Example: --labels EVENT,PRODUCT"),
    max_missing_images: float | None = typer.Option(
        None, help="Largest share of a split's posts whose image may be absent from --features (default 0.05). "
        "Example: --max-missing-images 0.2"),
    allow_missing_images: bool = typer.Option(
        False, "--allow-missing-images", help="Train even when posts' images are absent from --features "
        "(their visual input is zeros; the coverage is recorded in metrics.json)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the unfinished run in --out from its last finished epoch "
        "(`mner-train --out RUN --resume` is enough)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the mner run in --out (never a folder mner did not write)."),
    boxes: Path | None = typer.Option(
        None, help="GMNER: folder of Pascal VOC <image id>.xml gold boxes; adds the grounding head (candidates: "
        "the cache's detector objects) and GMNER/MNER/EEG scores. Example: --boxes data/twitter-gmner/xml"),
    track: str | None = typer.Option(
        None, help="Live curves: none | tensorboard | wandb | mlflow (default none; logs in <out>/tracking). "
        "Example: --track tensorboard"),
) -> None:
    """Train a model (the default command: `mner-train --data ...` means `mner-train train --data ...`).

    Multi-GPU: `torchrun --nproc_per_node 4 -m mner.trainer.cli --data ...` (see docs/training.md)."""
    from mner.trainer.core.train import train

    flags = {"text_encoder": text_encoder, "epochs": epochs, "batch_size": batch_size, "max_length": max_length,
             "encoder_lr": encoder_lr, "head_lr": head_lr, "crf_lr": crf_lr, "patience": patience, "seed": seed,
             "device": device, "num_workers": num_workers, "precision": precision, "grad_accum": grad_accum,
             "max_missing_images": max_missing_images, "track": track}
    if out is None:
        if resume:
            raise click.BadParameter("--resume needs the run folder: --out RUN", param_hint="--out")
        source = data if data is not None else features
        out = (Path("runs") / f"{model or 'bert_crf'}-{source.stem if source else 'data'}"
               f"-s{seed if seed is not None else 'default'}")
    train(out=out, model=model, data=data, features=features, preset=preset, sets=set_, flags=flags, labels=labels,
          allow_missing_images=allow_missing_images, overwrite=overwrite, resume=resume, boxes=boxes)


@app.command("evaluate")
def evaluate_command(
    run: Path = typer.Argument(..., help="A finished run directory. Example: runs/t15-crf"),
    split: str = typer.Option("test", help="test | dev | train. Example: --split dev"),
    data: Path | None = typer.Option(None, help="Other data (cross-domain). Example: --data data/twitter2017"),
    features: Path | None = typer.Option(None, help="Cache for --data's images. Example: --features cache/t17.h5"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N. Example: --device cpu"),
    allow_missing_images: bool = typer.Option(
        False, "--allow-missing-images", help="Score even when posts' images are absent from the cache."),
    boxes: Path | None = typer.Option(
        None, help="GMNER gold boxes (<image id>.xml); default: the run's own when it trained with --boxes. "
        "Example: --boxes data/twitter-gmner/xml"),
    uncovered: str | None = typer.Option(
        None, help="How boxed entities no candidate reaches count: hindex (cannot be right; default) | mqspn "
        "(None is right). Example: --uncovered mqspn"),
    iou: float | None = typer.Option(None, help="IoU a predicted box needs with a gold box (default 0.5). "
                                     "Example: --iou 0.5"),
    iou_compare: str | None = typer.Option(None, help="'>=' (default) or '>'. Example: --iou-compare '>'"),
) -> None:
    """Score a trained run; writes <run>/eval/<split>-<datahash>[-cache<fingerprint>].json, .conll and .parquet
    (with --boxes also GMNER/MNER/EEG and the grounded predictions .jsonl / .entities.parquet)."""
    from mner.trainer.evaluation.evaluate import evaluate_run

    if split not in ("train", "dev", "test"):
        raise click.BadParameter(f"{split!r}; valid values: train, dev, test", param_hint="--split")
    if uncovered is not None and uncovered not in ("hindex", "mqspn"):
        raise click.BadParameter(f"{uncovered!r}; valid values: hindex, mqspn", param_hint="--uncovered")
    if iou_compare is not None and iou_compare not in (">=", ">"):
        raise click.BadParameter(f"{iou_compare!r}; valid values: >=, >", param_hint="--iou-compare")
    gmner_sets = {k: v for k, v in {"gmner_uncovered": uncovered, "gmner_iou": iou,
                                    "gmner_iou_compare": iou_compare}.items() if v is not None}
    evaluate_run(run, split=split, data=data, features=features, device=device,
                 allow_missing_images=allow_missing_images, boxes=boxes, gmner_sets=gmner_sets)


@app.command("predict")
def predict_command(
    run: Path = typer.Argument(..., help="A finished run directory. Example: runs/t15-crf"),
    data: Path = typer.Option(..., help="Posts to tag (tags optional). Example: --data some/posts"),
    out: Path | None = typer.Option(
        None, help="Output file; its suffix picks the format: .conll (or .txt), .jsonl, .parquet. "
        "Example: --out tagged.jsonl"),
    images: Path | None = typer.Option(
        None, help="Folder of the posts' images (<IMGID>.jpg ...): images the run's cache lacks are extracted "
        "once, with the run's own stage-1 models, into a side cache. Example: --images new_posts/images"),
    side_cache: Path | None = typer.Option(
        None, help="Where --images are extracted (default <run>/side-caches/<images folder>-<hash>.h5; reused "
        "by the next call). Example: --side-cache cache/new-posts.h5"),
    features: Path | None = typer.Option(None, help="Cache holding --data's images (default: the run's cache)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N. Example: --device cpu"),
    batch_size: int | None = typer.Option(None, help="Posts per forward (default: the run's eval batch size)."),
    allow_missing_images: bool = typer.Option(
        False, "--allow-missing-images", help="Tag even when posts' images are absent from the caches."),
    stage1_weights: list[str] | None = typer.Option(
        None, "--stage1-weights", help="Local copy of weights or a user file (captions, grounding mapping) the "
        "cache's record names, as the extract flag and a path; checked by sha256; repeatable. Example: "
        "--stage1-weights detector-weights=/models/maskrcnn.pth --stage1-weights captions=/data/captions.tsv"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out written by mner-train predict (never another file, "
        "never an input)."),
) -> None:
    """Tag posts with a trained run. CoNLL `token pred` (`token gold pred` when tags are present), JSONL
    (entities with offsets and scores) or Parquet; with gold tags also <out>.errors.csv and a type confusion
    matrix (<out>.confusion.csv/.png). <out>.json records the caches, image statuses and warnings."""
    from mner.trainer.inference.predict import predict_run

    if batch_size is not None and batch_size < 1:
        raise click.BadParameter(f"{batch_size}; must be >= 1", param_hint="--batch-size")
    weights = {}
    for item in stage1_weights or []:
        flag, _, path = item.partition("=")
        valid = STAGE1_COPY_FLAGS
        if flag.lstrip("-") not in valid or not path:
            raise click.BadParameter(f"{item!r}; expected FLAG=PATH with FLAG one of {', '.join(valid)}",
                                     param_hint="--stage1-weights")
        key = "--" + flag.lstrip("-")
        if key == "--grounding-map":  # one copy per mapping file (matched to the record by hash)
            weights.setdefault(key, []).append(path)
        else:
            weights[key] = path
    predict_run(run, data=data, out=out, features=features, images=images, side_cache=side_cache, device=device,
                batch_size=batch_size, allow_missing_images=allow_missing_images, stage1_weights=weights,
                overwrite=overwrite)


@app.command("sweep")
def sweep_command(
    grid: Path = typer.Argument(..., help="Grid file (TOML). Example: grids/vcrmner.toml"),
    out: Path | None = typer.Option(None, help="Root of the run folders (default: the grid's `out`). "
                                    "Example: --out runs/vcrmner"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and their state (done/unfinished/todo)."),
    task: str | None = typer.Option(None, help="Run only every n-th run from i: i/n (SLURM arrays, one process "
                                    "per GPU). Example: --task $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"),
    set_: list[str] | None = typer.Option(None, "--set", help="Override for every run (after the grid's own); "
                                          "repeatable. Example: --set text_encoder=minilm-l6"),
    data: list[str] | None = typer.Option(None, help="Data folder of a grid dataset; repeatable. "
                                          "Example: --data t15=../shared/data/twitter2015"),
    features: list[str] | None = typer.Option(None, help="Feature cache of a grid dataset; repeatable. "
                                              "Example: --features t15=cache/t15.h5"),
    datasets: list[str] | None = typer.Option(None, "--datasets", help="Only runs on these datasets; repeatable. "
                                              "Example: --datasets t15"),
    seeds: list[int] | None = typer.Option(None, "--seed", help="Replace the grid's seeds; repeatable. "
                                           "Example: --seed 1 --seed 2"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N for every run. Example: --device cpu"),
    boxes: list[str] | None = typer.Option(None, help="GMNER gold boxes (XML folder) of a grid dataset; repeatable. "
                                           "Example: --boxes t15=data/twitter-gmner/xml"),
) -> int:
    """Run a grid of models x presets x switches x seeds x datasets/protocols; done runs are skipped."""
    from mner.trainer.experiments.sweep import sweep

    return sweep(grid, out=out, dry=dry_run, task=task, sets=set_, data=data, features=features,
                 datasets=datasets, seeds=seeds, device=device, boxes=boxes)


@app.command("tune")
def tune_command(
    space: Path = typer.Argument(..., help="Search space: a grid file of one configuration plus [search]. "
                                 "Example: grids/tune/bert_crf.toml"),
    out: Path | None = typer.Option(None, help="The study's folder (default: the space's `out`). "
                                    "Example: --out runs/tune/bert_crf"),
    trials: int | None = typer.Option(None, help="Trials the study should hold, over all workers (default: the "
                                      "space's [search] trials). Example: --trials 20"),
    storage: str | None = typer.Option(None, help="Where the study lives (default: <out>/study.journal); a journal "
                                       "file path, a .db file (SQLite) or a SQLAlchemy URL. "
                                       "Example: --storage sqlite:///studies.db"),
    set_: list[str] | None = typer.Option(None, "--set", help="Override for every trial (after the space's own); "
                                          "repeatable. Example: --set epochs=2"),
    data: list[str] | None = typer.Option(None, help="Data folder of a space dataset. "
                                          "Example: --data t15=../shared/data/twitter2015"),
    features: list[str] | None = typer.Option(None, help="Feature cache of a space dataset. "
                                              "Example: --features t15=cache/t15.h5"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N for every trial. Example: --device cpu"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the space and print what a trial trains."),
) -> int:
    """Search hyper-parameters on Optuna: each trial an ordinary run folder, pruned on dev F1 after each epoch.
    Several processes (GPUs, hosts, a SLURM array) may run the same command on one study at once."""
    from mner.trainer.experiments.tune import tune

    return tune(space, out=out, trials=trials, storage=storage, sets=set_, data=data, features=features,
                device=device, dry=dry_run)


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run folders or folders holding them. Example: runs/vcrmner"),
    out: Path = typer.Option(Path("report"), help="Output folder (tables + PNGs). Example: --out report/vcrmner"),
    compare: list[str] | None = typer.Option(None, help="Two configuration ids for a paired bootstrap test; "
                                             "give the option twice. Example: --compare t15/vcrmner/paper "
                                             "--compare t15/vcrmner/wo-ev"),
    min_coverage: float = typer.Option(0.9, help="Flag runs whose test posts have an image feature row for "
                                       "less than this share. Example: --min-coverage 0.95"),
    bootstrap: int = typer.Option(1000, help="Bootstrap samples of the significance test. Example: --bootstrap 5000"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the report in --out (only a folder an earlier "
                                   "`mner-train report` wrote)."),
) -> None:
    """Collect finished runs into results.{csv,parquet,md} (mean +/- std beside the papers) and PNG plots."""
    from mner.trainer.experiments.report import report

    report(runs, out=out, compare=compare, min_coverage=min_coverage, bootstrap=bootstrap, overwrite=overwrite)


@app.command("show")
def show_command(
    run: Path = typer.Argument(..., help="A run with grounded predictions (--boxes). Example: runs/gmner-vcrmner"),
    post: str = typer.Option(..., help="Post id (test-12) or image id (71044). Example: --post test-12"),
    split: str | None = typer.Option(None, help="test | dev (default: test, then dev). Example: --split dev"),
    images: Path | None = typer.Option(None, help="Folder of <image id>.jpg (default: the one the cache was "
                                       "extracted from). Example: --images data/twitter-gmner/images"),
    out: Path | None = typer.Option(None, help="PNG to write (default RUN/figures/<post id>.png). "
                                    "Example: --out post.png"),
) -> None:
    """GMNER: draw one post's picture with its gold (green) and predicted (orange) regions, labelled."""
    from mner.trainer.gmner.figures import show_post

    path, note = show_post(run, post, split=split, images=images, out=out)
    if note:
        print(f"mner-train show: {note}", file=sys.stderr)
    print(path)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``mner-train``); returns the exit status so tests can call it directly."""
    from mner.pipeline.cache import CacheError
    from mner.pipeline.data import DataFormatError
    from mner.pipeline.devices import DeviceError
    from mner.pipeline.outputs import OutputError, describe_os_error
    from mner.trainer.core.config import ConfigError
    from mner.trainer.core.run_folder import RunFolderError
    from mner.trainer.core.train import RunInterrupted, TrainingDiverged
    from mner.trainer.inputs.text_encoder import TextEncoderError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h"):
        args = ["train", *args]
    try:
        result = app(args=args, prog_name="mner-train", standalone_mode=False)
    except (click.exceptions.ClickException, USAGE_ERROR) as err:  # a wrong flag: usage, valid values, exit 2
        err.show()
        return err.exit_code
    except (click.exceptions.Abort, typer.Abort):  # click turns Ctrl-C outside training into Abort
        print("mner-train: interrupted", file=sys.stderr)
        return 130
    except RunInterrupted as err:
        print(f"mner-train: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("mner-train: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"mner-train: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, CacheError, DataFormatError, DeviceError, TextEncoderError, RunFolderError, OutputError,
            FileExistsError, FileNotFoundError) as err:
        print(f"mner-train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only file system, a name too long: one line, not a traceback
        print(f"mner-train: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyError as err:  # unknown model name: the registry's message lists the valid ones
        print(f"mner-train: error: {err.args[0]}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
