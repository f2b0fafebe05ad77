"""``mner-features``: extract visual features once into an HDF5 cache; inspect and merge caches.

The typer functions only parse arguments; the work is in ``extract.run_extraction``. Nothing at module
level imports torch: ``info`` and ``merge`` answer in a fraction of a second (torch loads only in
``extract``).
"""

from __future__ import annotations

import os
import sys

import typer

_COMMAND: list[str] = []  # the command line main() was given (recorded in provenance)


app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    help="Stage 1 of mner: run detectors and image encoders once and cache their outputs in HDF5.\n\n"
         "Examples:\n\n"
         "  mner-features extract --data data/twitter2015 --images data/twitter2015_images "
         "--out cache/t15.h5 --detector maskrcnn --encoder clip --encoder resnet152 --prompts vcrmner\n\n"
         "  mner-features info cache/t15.h5\n\n"
         "  mner-features merge cache/t15.shard*.h5 --out cache/t15.h5",
)


@app.command()
def extract(
    data: str = typer.Option(..., help="dataset folder (train/valid/test.txt) or one file"),
    images: str | None = typer.Option(None, help="folder with <IMGID>.jpg (also .png/.jpeg/.gif/.webp or no "
                                         "extension); a missing or empty folder is an error"),
    no_images: bool = typer.Option(False, "--no-images", help="build the cache over the id list without any "
                                   "picture (every image missing; recorded in provenance)"),
    out: str = typer.Option("cache/features.h5", help="cache file; existing groups are kept, missing ones added"),
    for_models: list[str] = typer.Option([], "--for", help="repeatable: build what these models' paper preset "
                                         "and ablation rows read (vcrmner | pmner | promptmner | mgipscl | espvr "
                                         "| all), in one pass; the plan is printed first"),
    group: list[str] = typer.Option([], "--group", help="repeatable: any declared group instance to build, by "
                                     "path (crops/fasterrcnn/clip/RN50, a group a plugin registered); its producer "
                                     "comes from the registry"),
    import_objects: list[str] = typer.Option([], "--import-objects", help="repeatable NAME=FILE.json|FILE.npz: "
                                             "your own per-image candidate boxes (pixels, scores, optional class "
                                             "names) as the objects/NAME instance; crops cut from the images, "
                                             "sha256 in provenance (docs/gmner.md)"),
    tiny: bool = typer.Option(False, "--tiny", help="with --for: every detector and encoder by its tiny random "
                              "test variant (implies --random-init; each records the model it stands for)"),
    override_paper: bool = typer.Option(False, "--override-paper", help="with --for: keep flags that contradict "
                                        "a paper's setting (recorded in the groups' provenance)"),
    detector: list[str] = typer.Option([], "--detector", help="repeatable: maskrcnn | fasterrcnn | detectron2 (| "
                                       "maskrcnn-test | fasterrcnn-test: tiny random test variants); each is one "
                                       "objects/<name> instance (default: the cache's, else maskrcnn)"),
    encoder: list[str] | None = typer.Option(None, "--encoder", help="repeatable: clip | resnet152 | swin "
                                             "(| clip-test | resnet152-test | swin-test: few-layer random test "
                                             "variants); default clip (none with --for)"),
    prompts: list[str] = typer.Option([], "--prompts", help="repeatable prompt set: vcrmner | vcrmner_words | "
                                      "promptmner_task | promptmner_kb | promptmner_expert | FILE.json"),
    grounding: str | None = typer.Option(
        None, help="grounding crops for mgipscl (3 per image, 128x128 pixels): owlv2 (text-conditioned OWLv2 queried "
        "with the posts' capitalised spans + entity-type phrases) | detector (top 3 objects of --detector) | files "
        "(your HVPNeT-style crops: --grounding-map, --grounding-crops-dir). See docs/grounding-captions.md"),
    grounding_model: str = typer.Option("google/owlv2-base-patch16-ensemble", help="owlv2: hub name or local folder"),
    grounding_threshold: float = typer.Option(0.1, help="owlv2: a box needs a query probability above this (0..1)"),
    grounding_fill: str = typer.Option("objectness", help="owlv2: objectness (top up to 3 crops with OWLv2's most "
                                       "object-like boxes, query-free) | none"),
    grounding_queries: str = typer.Option("spans", help="owlv2: spans (each run of capitalised tokens is one query) "
                                          "| words (each capitalised word is one query)"),
    grounding_map: list[str] = typer.Option([], "--grounding-map", help="files, repeatable: HVPNeT *_dict.pth or "
                                            ".json mapping {image file or id: [crop files]}"),
    grounding_crops_dir: list[str] = typer.Option([], "--grounding-crops-dir", help="files, repeatable: the crops "
                                                  "folder, one for all mappings or one per --grounding-map in order"),
    grounding_clip: bool = typer.Option(False, "--grounding-clip", help="also cache frozen CLIP vision states of "
                                        "every crop (encoders/clip_grounding: mgipscl's frozen mode)"),
    grounding_clip_model: str = typer.Option("openai/clip-vit-base-patch32", help="--grounding-clip: "
                                             "CLIPVisionModel hub name or local folder"),
    grounding_clip_layers: str = typer.Option("6,12", help="--grounding-clip: hidden states kept (0 = embeddings, "
                                              "i = output of layer i)"),
    captions: str | None = typer.Option(None, help="captions for espvr: blip | FILE.jsonl "
                                           '({"image_id": ..., "caption": ...} a line) | FILE.tsv (id<TAB>caption)'),
    caption_model: str = typer.Option("Salesforce/blip-image-captioning-base", help="blip: hub name or local folder"),
    caption_max_tokens: int = typer.Option(30, help="blip: longest caption in tokens"),
    caption_beams: int = typer.Option(3, help="blip: beam width (1 = greedy)"),
    caption_prompt: str = typer.Option("", help='blip: conditional captioning prefix, e.g. "a picture of"'),
    random_init: bool = typer.Option(False, "--random-init", help="random weights everywhere, nothing downloaded "
                                     "(offline smoke runs; recorded in provenance, the trainer warns)"),
    device: str = typer.Option("auto", help="auto (the LOCAL_RANK GPU under torchrun, cuda:0, else cpu) | cpu | "
                               "cuda | cuda:N"),
    batch_size: int = typer.Option(32, help="images/crops per encoder forward"),
    num_workers: int | None = typer.Option(None, help="DataLoader worker processes decoding and resizing "
                                              "images (default: all cores but one, at most 8; 0: main process)"),
    top_k: int | None = typer.Option(None, help="objects kept per image (default 10: P-MNER reads its first 5)"),
    score_threshold: float | None = typer.Option(None, help="detector score cut (default 0.5, 0 with --random-init; "
                                                 "P-MNER cuts its 0.95 when reading)"),
    detector_min_size: int = typer.Option(800, help="detector input shorter side (torchvision default 800)"),
    detector_weights: str | None = typer.Option(None, help="local detector state dict (sha256 recorded)"),
    detectron2_config: str = typer.Option("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
                                          help="detectron2 model-zoo config (with --detector detectron2)"),
    clip_model: list[str] = typer.Option([], "--clip-model", help="repeatable open_clip architecture: each is one "
                                         "encoders/clip/<name> instance (default: the cache's, else ViT-B-32; "
                                         "<arch>-test: a tiny random CLIP standing for <arch>)"),
    clip_pretrained: str = typer.Option("openai", help="open_clip pretrained tag or local checkpoint file"),
    resnet_weights: str | None = typer.Option(None, help="local torchvision resnet152 state dict"),
    swin_model: str = typer.Option("microsoft/swin-large-patch4-window12-384", help="hub name or local folder"),
    crop_max_side: int = typer.Option(384, help="stored JPEG crops: longer side cap"),
    crop_quality: int = typer.Option(90, help="stored JPEG crops: quality"),
    max_image_side: int = typer.Option(2048, help="huge images are downscaled to this before the models"),
    missing_image: str = typer.Option("placeholder", help="placeholder (gray image's features) | zeros | "
                                      "error (list bad images, exit 2 before any compute)"),
    max_bad_images: float | None = typer.Option(None, help="share of images (0..1) allowed to be missing or "
                                                   "unreadable; more is an error (exit 2)"),
    chunk_size: int = typer.Option(64, help="images per resumable chunk"),
    shard: str | None = typer.Option(None, help="i/n: this process's share (default: RANK/WORLD_SIZE or "
                                        "SLURM_ARRAY_TASK_ID/COUNT); writes <out stem>.shard<i>of<n>.h5"),
    overwrite: bool = typer.Option(False, "--overwrite", help="rebuild the cache instead of adding missing groups"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run a detector, encoders and prompt sets over a dataset's images (resumable, shardable).

    Example (offline smoke run):

      mner-features extract --data data/twitter2015 --images imgs --out cache/t15.h5 --random-init
      --score-threshold 0 --encoder clip --encoder resnet152 --prompts vcrmner

    Grounding crops and captions (MGIPS-CL, ESPVR; docs/grounding-captions.md):

      mner-features extract ... --grounding owlv2 --grounding-clip --captions blip [--random-init]

      mner-features extract ... --grounding files --grounding-map t15_train_dict.pth
      --grounding-crops-dir aux/train/crops --captions captions.tsv
    """
    from mner.features.producers.grounding_captions import caption_options, grounding_options
    from mner.features.run.extract import ExtractOptions, ImageError, parse_shard, run_extraction
    from mner.pipeline.cache import CacheError
    from mner.pipeline.data import DataFormatError
    from mner.pipeline.outputs import OutputError, describe_os_error

    try:
        opts = ExtractOptions(
            data=data, images=images, out=out, detector=list(detector), prompts=list(prompts),
            encoders=list(encoder) if encoder else None, for_models=list(for_models), tiny=tiny,
            import_objects=list(import_objects), groups=list(group),
            override_paper=override_paper,
            random_init=random_init, device=device, batch_size=batch_size, num_workers=num_workers, top_k=top_k,
            score_threshold=score_threshold, detector_min_size=detector_min_size, detector_weights=detector_weights,
            detectron2_config=detectron2_config, clip_model=list(clip_model), clip_pretrained=clip_pretrained,
            resnet_weights=resnet_weights, swin_model=swin_model, crop_max_side=crop_max_side,
            crop_quality=crop_quality, max_image_side=max_image_side, missing_image=missing_image,
            chunk_size=chunk_size, shard=parse_shard(shard) if shard else None, overwrite=overwrite,
            no_images=no_images, max_bad_images=max_bad_images, progress=progress, command=list(_COMMAND),
            grounding=grounding_options(grounding, grounding_model, grounding_threshold, grounding_fill,
                                        grounding_queries, grounding_map, grounding_crops_dir, grounding_clip,
                                        grounding_clip_model, grounding_clip_layers),
            captions=caption_options(captions, caption_model, caption_max_tokens, caption_beams, caption_prompt),
            # the --grounding* / --caption* values for the groups a --for plan adds (grounding owlv2, captions blip)
            grounding_settings=grounding_options("", grounding_model, grounding_threshold, grounding_fill,
                                                 grounding_queries, [], [], True, grounding_clip_model,
                                                 grounding_clip_layers),
            caption_settings=caption_options("blip", caption_model, caption_max_tokens, caption_beams,
                                             caption_prompt),
        )
        opts.validate()
        _check_names(opts)
        summary = run_extraction(opts)
    except ImageError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    except (ValueError, RuntimeError, CacheError, DataFormatError, OutputError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error
    except OSError as error:  # disk full, read-only file system, a name too long: one line, the path, the fix
        typer.echo(f"error: {describe_os_error(error, out)}", err=True)
        raise typer.Exit(1) from error
    except KeyboardInterrupt as interrupt:
        signal_name = "SIGTERM" if isinstance(interrupt, Terminated) else "interrupted (Ctrl-C)"
        typer.echo(f"{signal_name}: stopped; finished chunks are kept in {out}.parts and no lock or temp file is "
                   "left: run the same command again to continue", err=True)
        raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None
    typer.echo(str(summary))
    if summary.shard_count > 1:
        from mner.features.run.distributed import merge_hint

        typer.echo(merge_hint(out, summary.shard_count))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `timeout`): unwinds like Ctrl-C, so the lock and temp files are removed."""


def _raise_terminated(signum, frame):
    raise Terminated()


@app.command()
def info(
    path: str = typer.Argument(..., help="cache file"),
    verify_: bool = typer.Option(False, "--verify", help="also recompute every group's checksum against its "
                                 "data (as `mner-features verify`); exit 1 on a mismatch"),
) -> None:
    """Print groups (checked against their specs), shapes, fingerprints, provenance and per-image status
    counts with their causes. Exits 1 on a file that is not an mner cache.

    Example: mner-features info cache/t15.h5 --verify
    """
    from mner.pipeline.cache import CacheError, describe

    try:
        typer.echo(describe(path))
        if verify_:
            _verify(path)
        else:
            typer.echo("checksums: not recomputed (mner-features verify CACHE, or info --verify)")
    except (CacheError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


@app.command()
def verify(path: str = typer.Argument(..., help="cache file")) -> None:
    """Recompute every group's checksum against its data: one line per group, exit 0 when all match, 1
    otherwise (a mismatch names the dataset rows that changed).

    Example: mner-features verify cache/t15.h5
    """
    from mner.pipeline.cache import CacheError

    try:
        _verify(path)
    except (CacheError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


def _verify(path: str) -> None:
    from mner.pipeline.cache.integrity import verify_cache

    result = verify_cache(path)
    for line in result.lines():
        typer.echo(line)
    if not result.ok:
        typer.echo(f"{path}: checksums do not match (the file changed on disk); re-extract the groups marked "
                   "MISMATCH (mner-features extract ... --overwrite)", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: all {len(result.groups)} groups match their checksums")


@app.command()
def merge(
    shards: list[str] = typer.Argument(..., help="shard caches (e.g. cache/t15.shard*.h5)"),
    out: str = typer.Option(..., help="merged cache"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="merge even when shards of the "
                                       "extraction are missing (recorded in the merged cache's provenance)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out (only an mner cache, "
                                   "never another file)"),
) -> None:
    """Merge the shards of one extraction into the cache a single process would have written.

    Refuses an incomplete shard set (every shard i/n of the same id list must be given).

    Example: mner-features merge cache/t15.shard0of2.h5 cache/t15.shard1of2.h5 --out cache/t15.h5
    """
    from mner.pipeline.cache import CacheError, merge_caches
    from mner.pipeline.outputs import OutputError, describe_os_error

    try:
        merge_caches(shards, out, allow_partial=allow_partial, overwrite=overwrite)
    except (CacheError, ValueError, OutputError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error
    except OSError as error:
        typer.echo(f"error: {describe_os_error(error, out)}", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"merged {len(shards)} shards into {out}")


def _check_names(opts) -> None:
    """Bad component names fail before any model is built, listing the valid values."""
    from mner.features.producers.detectors import DETECTORS
    from mner.features.producers.encoders import ENCODERS
    from mner.features.producers.prompts import load_prompt_set

    for name in opts.detectors:
        if name not in DETECTORS:
            raise ValueError(f"--detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    for name in opts.imported_objects():  # NAME=FILE parsed (a bad value is an error naming the form)
        if name in DETECTORS:
            raise ValueError(f"--import-objects {name}=...: {name} is a detector's name; choose another NAME")
    for name in opts.encoders or []:
        if name not in ENCODERS:
            raise ValueError(f"--encoder {name!r}; valid: {', '.join(sorted(ENCODERS))}")
    for name in opts.prompts:
        load_prompt_set(name)


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``mner-features``; returns the exit code (tests call ``main([...])``)."""
    import signal

    _COMMAND[:] = ["mner-features", *(sys.argv[1:] if argv is None else argv)]
    try:  # SIGTERM unwinds like Ctrl-C (locks and temp files removed, one line printed)
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave it
        previous = None
    hooks = sys.excepthook, sys.unraisablehook, sys.stderr
    sys.excepthook, sys.unraisablehook = _quiet_hdf5_release(hooks[0]), _quiet_hdf5_release(hooks[1])
    sys.stderr = _DropHdf5ReleaseTracebacks(sys.stderr)
    code = 0
    try:
        app(args=argv, prog_name="mner-features")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.excepthook, sys.unraisablehook, sys.stderr = hooks
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if _HDF5_RELEASE_FAILED and argv is None:
        # After a write failed inside HDF5 (a disk filling mid-write) the library cannot release that file,
        # and its exit handler crashes the interpreter (SIGSEGV) after the one-line error. The temp file and
        # the lock are already removed and the chunks kept: leave without running it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


_HDF5_RELEASE_FAILED: list[str] = []  # h5py could not release a handle after a failed write (see main)
_RELEASE_ERROR = "RuntimeError: Can't decrement id ref count"


class _DropHdf5ReleaseTracebacks:
    """stderr without the tracebacks h5py's C code prints (bypassing the hooks) for each handle it cannot
    release after a failed write; everything else passes through at once (progress bars included)."""

    def __init__(self, stream):
        self.stream, self.held = stream, ""

    def write(self, text: str) -> int:
        if not self.held and not text.startswith("Traceback (most recent call last):"):
            return self.stream.write(text)
        self.held += text
        lines = self.held.split("\n")[:-1]  # complete lines
        if any(line.startswith(_RELEASE_ERROR) for line in lines):
            if "errno = " in self.held and self.held.endswith(")\n"):  # the whole message: dropped
                _HDF5_RELEASE_FAILED.append(self.held[-80:])
                self.held = ""
        elif any(not line.startswith(("Traceback", "  ")) for line in lines):  # another traceback: shown
            held, self.held = self.held, ""
            self.stream.write(held)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _quiet_hdf5_release(hook):
    """h5py reports every handle it cannot release after a failed write (``RuntimeError: Can't decrement
    id ref count (file write failed ... errno = 28 ...)``) as a traceback: the command says it in one line."""
    def quiet(*args):
        error = args[1] if len(args) == 3 else args[0].exc_value
        if isinstance(error, RuntimeError) and "id ref count" in str(error) and "errno = " in str(error):
            _HDF5_RELEASE_FAILED.append(str(error)[:80])
            return
        hook(*args)

    return quiet



if __name__ == "__main__":
    sys.exit(main())
