"""The first-GPU check (issue 19): one command, one JSON of figures and pass/fail lines.

    bash bench/gpu_check.sh                                # on a GPU machine: every check, < 8 minutes
    bash bench/gpu_check.sh --mode cpu                     # what a CPU can run (tiny variants, fp32/bf16)
    python bench/gpu_check.py --mode cpu --quick --out x.json   # the fast form tests/test_gpu_check.py runs

Checks (``gpu``: needs CUDA, reported as ``skip`` in CPU mode; see docs/gpu.md for what each proves):

- ``train_presets``: every model's tiny variant x every ablation preset, one epoch, bf16 on the GPU
  (fp32 on a CPU), the training epoch under ``torch.cuda.set_sync_debug_mode("warn")`` (host syncs
  per step counted); ``evaluate`` of each run must equal its ``metrics.json`` dev scores;
- ``train_fp16`` (gpu): every model's default preset in fp16 (GradScaler), same checks;
- ``resume``: a run interrupted in epoch 2 and resumed: AdamW's ``step`` counters on the CPU, its
  moments on the run's device, metrics equal to an uninterrupted run, epoch time after the resume
  against the uninterrupted run's;
- ``ddp``: two processes (gloo; on a GPU both share it, ``MNER_DDP_BACKEND=gloo``) train pmner with
  patience, promptmner with image-less batches and bert_crf with a short last batch: every post
  once per epoch, replicas agree, nothing hangs (killed after a timeout);
- ``fast_ablation_memory`` (gpu): after a fast-ablation run no GPU memory stays held (the sweep
  process's encoder-output table lives in host memory);
- ``stage1_cpu_vs_gpu`` (gpu): 64 generated images through stage 1 on the CPU and on the GPU (loader
  workers): same objects and boxes, features within fp16 tolerance, GPU busy share from CUDA events,
  peak GPU memory at chunk sizes 16 and 64 (must not grow with the chunk);
- ``full_stack`` (gpu): throughput of Faster R-CNN + CLIP ViT-B-32 + ResNet-152 + Swin-L (random-init
  real architectures) on 640x480 images;
- ``precision_step`` (gpu): a bf16 against an fp32 training epoch (bench/bench_precision.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/corpus.py, bench/bench_extract.py, bench/bench_precision.py
sys.path.insert(1, str(HERE.parent / "tests"))  # tests/helpers/forked.py: the two-process runner


# ------------------------------------------------------------------------------------------- inputs
def write_tiny_encoder(folder: Path) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM-L6's tokenizer (offline; the weights do not matter)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from mner.trainer.inputs.text_encoder import resolve_text_encoder

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_text_encoder("minilm-l6"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


class Inputs:
    def __init__(self, work: Path):
        from mner.pipeline.cache.tiny import write_tiny_training_inputs

        self.work = work
        self.encoder = write_tiny_encoder(work / "encoder")
        # train post 6 and posts 8..13 have no usable image: batches of 2 with no image occur
        data, cache = write_tiny_training_inputs(work / "inputs", train_posts=21, missing=(6, *range(8, 14)))
        self.data, self.cache = Path(data), Path(cache)

    def argv(self, model: str, out: Path, *, device: str, precision: str, epochs: int = 1,
             preset: str | None = None, extra: list[str] | None = None) -> list[str]:
        from mner.pipeline.cache.tiny import EVERY_MODEL_FLAGS

        return ["--features", str(self.cache), "--data", str(self.data), "--model", model,
                *(["--preset", preset] if preset else []), "--text-encoder", str(self.encoder),
                "--epochs", str(epochs), "--batch-size", "4", "--max-length", "24",
                "--patience", "0", "--device", device, "--precision", precision, "--seed", "3",
                "--set", "stage1_mismatch=warn", "--max-missing-images", "1", "--out", str(out), "--overwrite",
                *EVERY_MODEL_FLAGS[model], *(extra or [])]


# ------------------------------------------------------------------------------------------- checks
def counted_syncs(device: str):
    """Wraps the engine's epoch in ``set_sync_debug_mode("warn")`` on CUDA; returns the wrapper's counts."""
    import torch

    from mner.trainer.core.engine import Engine

    counts = {"syncs": 0, "steps": 0}
    original = Engine.train_epoch

    def train_epoch(self, model, loader, *args, **kwargs):
        if not device.startswith("cuda"):
            return original(self, model, loader, *args, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, model, loader, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                counts["syncs"] += sum("synchroniz" in str(w.message) for w in caught)
                counts["steps"] += len(loader)

    return counts, train_epoch


def train_and_evaluate(inputs: Inputs, model: str, preset: str | None, *, device: str, precision: str,
                       out: Path) -> dict:
    from mner.trainer.cli import main as train_main
    from mner.trainer.core.engine import Engine

    counts, wrapper = counted_syncs(device)
    original = Engine.train_epoch
    Engine.train_epoch = wrapper
    try:
        code = train_main(inputs.argv(model, out, device=device, precision=precision, preset=preset))
    except Exception as err:  # a model bug: this run fails, the others still run
        return {"model": model, "preset": preset, "ok": False, "detail": f"{type(err).__name__}: {err}"}
    finally:
        Engine.train_epoch = original
    if code != 0:
        return {"model": model, "preset": preset, "ok": False, "detail": f"mner-train exited {code}"}
    metrics = json.loads((out / "metrics.json").read_text())
    eval_code = train_main(["evaluate", str(out), "--split", "dev", "--device", device])
    evaluated = json.loads(next((out / "eval").glob("dev-*.json")).read_text()) if eval_code == 0 else {}
    same = evaluated.get("micro") == metrics["dev"]["micro"]
    per_step = counts["syncs"] / counts["steps"] if counts["steps"] else None
    return {"model": model, "preset": preset, "ok": bool(same), "precision": metrics["run"]["precision"],
            "decode_precision": metrics["run"].get("decode_precision"), "evaluate_equals_metrics": same,
            "syncs_per_step": per_step, "epoch_seconds": metrics["run"]["epoch_seconds"]}


def check_train_presets(inputs: Inputs, args) -> tuple[bool, dict]:
    from mner.trainer.models import available_models, get_model_class

    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    runs = []
    for model in (["bert_crf"] if args.quick else available_models()):
        presets = [None] if args.quick else list(get_model_class(model).PRESETS)
        for preset in presets:
            runs.append(train_and_evaluate(inputs, model, preset, device=args.device, precision=precision,
                                           out=inputs.work / "runs" / "run"))
    failed = [f"{r['model']}/{r['preset']}: {r.get('detail', 'evaluate differs from metrics.json')}"
              for r in runs if not r["ok"]]
    return not failed, {"runs": runs, "failed": failed, "precision": precision}


def check_train_fp16(inputs: Inputs, args) -> tuple[bool, dict]:
    from mner.trainer.models import available_models

    runs = [train_and_evaluate(inputs, model, None, device=args.device, precision="fp16",
                               out=inputs.work / "runs" / "run") for model in available_models()]
    failed = [f"{r['model']}: {r.get('detail', 'evaluate differs')}" for r in runs if not r["ok"]]
    return not failed, {"runs": runs, "failed": failed}


def check_resume(inputs: Inputs, args) -> tuple[bool, dict]:
    import torch

    from mner.trainer.cli import main as train_main
    from mner.trainer.core.engine import Engine

    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    reference, resumed = inputs.work / "runs" / "reference", inputs.work / "runs" / "resumed"
    epochs = 2 if args.quick else 3  # interrupted in epoch 2 either way
    assert train_main(inputs.argv("pmner", reference, device=args.device, precision=precision, epochs=epochs)) == 0
    placement = {}
    original_epoch, original_load = Engine.train_epoch, Engine.load_checkpoint
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_epoch(self, *a, **k)

    def load_and_look(self, folder, model, optimizer, scheduler):
        original_load(self, folder, model, optimizer, scheduler)
        states = list(optimizer.state.values())
        placement["step_devices"] = sorted({str(s["step"].device) for s in states if "step" in s})
        placement["moment_devices"] = sorted({str(s["exp_avg"].device) for s in states if "exp_avg" in s})
        placement["parameter_devices"] = sorted({str(p.device) for p in model.parameters()})

    Engine.train_epoch = interrupted
    try:
        assert train_main(inputs.argv("pmner", resumed, device=args.device, precision=precision,
                                      epochs=epochs)) == 130
    finally:
        Engine.train_epoch = original_epoch
    Engine.load_checkpoint = load_and_look
    try:
        assert train_main(["--out", str(resumed), "--resume"]) == 0
    finally:
        Engine.load_checkpoint = original_load

    def comparable(run: Path) -> dict:
        metrics = json.loads((run / "metrics.json").read_text())
        return {"dev": metrics["dev"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
                "loss": [round(h["loss"], 5) for h in metrics["history"]]}

    same = comparable(reference) == comparable(resumed)
    seconds = [json.loads((run / "metrics.json").read_text())["history"][-1]["train_seconds"]
               for run in (reference, resumed)]
    ratio = seconds[1] / seconds[0] if seconds[0] else None
    on_cpu = placement.get("step_devices") == ["cpu"]
    with_params = placement.get("moment_devices") == placement.get("parameter_devices")
    flat = ratio is not None and ratio < 1.5
    # on a GPU non-deterministic kernels may make the two runs differ slightly: a figure, not a criterion
    ok = on_cpu and with_params and (flat if args.device.startswith("cuda") else same)
    figures = {**placement, "metrics_equal_uninterrupted": same,
               "last_epoch_train_seconds_resumed_over_uninterrupted": ratio, "cuda": torch.cuda.is_available()}
    return ok, figures


def check_ddp(inputs: Inputs, args) -> tuple[bool, dict]:
    from helpers.forked import recorded_posts, run_forked  # tests/helpers: the suite's DDP runner

    runs = {"pmner": ["--patience", "1"], "promptmner": [], "bert_crf": []}
    argvs = []
    for model, extra in runs.items():
        argv = inputs.argv(model, inputs.work / "ddp" / model, device=args.device, precision="fp32", epochs=3,
                           extra=extra)
        argvs.append([a for a in argv if a != "--overwrite"])
    env = {"MNER_DDP_BACKEND": "gloo"} if args.device.startswith("cuda") else {}
    folder = inputs.work / "ddp"
    folder.mkdir(parents=True, exist_ok=True)
    codes, logs = run_forked([argvs, argvs], folder, timeout=args.ddp_timeout, record=True, **env)
    figures = {"exit_codes": codes, "hung": codes.count(None), "models": {}}
    ok = codes == [0, 0]
    seen = recorded_posts(folder, 2) if ok else [[], []]
    for index, model in enumerate(runs):
        metrics_file = inputs.work / "ddp" / model / "metrics.json"
        if not metrics_file.is_file():
            ok = False
            continue
        metrics = json.loads(metrics_file.read_text())
        epochs = list(zip(seen[0][index], seen[1][index]))
        once = all(sorted(a + b) == list(range(21)) for a, b in epochs)
        agree = all(h.get("replicas_agree") for h in metrics["history"])
        figures["models"][model] = {"epochs": len(epochs), "every_post_once": once, "replicas_agree": agree,
                                    "dev_f1_by_rank": [h.get("dev_f1_by_rank") for h in metrics["history"]]}
        ok = ok and once and agree
    if not ok:
        figures["log_tail"] = [log[-1500:] for log in logs]
    return ok, figures


def check_fast_ablation_memory(inputs: Inputs, args) -> tuple[bool, dict]:
    """After a fast-ablation run the process's GPU memory is back where it was: the encoder-output
    table that the sweep process keeps lives in host memory."""
    import gc

    import torch

    from mner.trainer.cli import main as train_main
    from mner.trainer.core import fast_text

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    argv = inputs.argv("bert_crf", inputs.work / "runs" / "fast", device=args.device, precision="bf16",
                       extra=["--set", "fast_ablation=true"])
    assert train_main(argv) == 0
    gc.collect()
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated()
    devices = sorted({str(t.device) for table in fast_text._SHARED_TABLES.values() for t in table.values()})
    ok = devices == ["cpu"] and after - before < 2**20
    return ok, {"table_devices": devices, "gpu_bytes_held_after_run": after - before}


class CacheArrays:
    """Whole datasets of a cache file, by path."""

    def __init__(self, file):
        self.file = file

    def read(self, path: str):
        return self.file[path][()]


def check_stage1(inputs: Inputs, args) -> tuple[bool, dict]:
    import h5py
    import numpy as np
    import torch
    from corpus import make_corpus

    from mner.features.run.extract import Extraction, ExtractOptions

    data, images = make_corpus(inputs.work / "stage1", 64)

    def extract(device: str, chunk: int, name: str) -> tuple[Path, dict]:
        options = ExtractOptions(data=str(data), images=str(images), out=str(inputs.work / "stage1" / name),
                                 detector="fasterrcnn-test", encoders=["clip-test", "resnet152-test"],
                                 random_init=True, device=device, batch_size=16, chunk_size=chunk,
                                 num_workers=2, top_k=5, score_threshold=0.0, detector_min_size=256,
                                 progress=False)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        extraction = Extraction(options)
        extraction.run()
        stats = dict(extraction.loop_stats)
        if device.startswith("cuda"):
            stats["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return Path(options.out), stats

    cpu_cache, _ = extract("cpu", 64, "cpu.h5")
    gpu_cache, gpu_stats = extract(args.device, 64, "gpu64.h5")
    _, small_stats = extract(args.device, 16, "gpu16.h5")
    cpu, gpu = CacheArrays(h5py.File(cpu_cache, "r")), CacheArrays(h5py.File(gpu_cache, "r"))
    same_objects = np.array_equal(cpu.read("objects/offsets"), gpu.read("objects/offsets"))
    box_error = box_share = None
    if same_objects:  # fp16 backbones can swap two near-tied detections: most boxes must agree to 1 px
        per_box = np.abs(cpu.read("objects/boxes") - gpu.read("objects/boxes")).max(axis=1)
        box_error, box_share = float(per_box.max()), float((per_box < 1.0).mean())
    feature_error = {}
    for path in ("encoders/clip-test/image_embed", "encoders/resnet152-test/grid", "encoders/clip-test/crop_embed"):
        a, b = cpu.read(path).astype(np.float32), gpu.read(path).astype(np.float32)
        if path.endswith("crop_embed") and box_error is not None:  # crops of the boxes that agree
            a, b = a[per_box < 1.0], b[per_box < 1.0]
        if a.shape == b.shape and a.size:
            feature_error[path] = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6))
    busy = sum(gpu_stats["device_seconds"].values()) / gpu_stats["wall"] if gpu_stats["device_seconds"] else None
    memory_ratio = (gpu_stats["peak_gpu_mib"] / small_stats["peak_gpu_mib"]) if "peak_gpu_mib" in gpu_stats else 0.0
    ok = (same_objects and box_share is not None and box_share >= 0.9
          and all(error < 2e-2 for error in feature_error.values()) and memory_ratio < 1.3)
    return ok, {"objects_equal": same_objects, "max_box_error_px": box_error, "share_of_boxes_within_1px": box_share,
                "max_relative_feature_error": feature_error, "gpu_busy_share": busy,
                "peak_gpu_mib_chunk64": gpu_stats.get("peak_gpu_mib"),
                "peak_gpu_mib_chunk16": small_stats.get("peak_gpu_mib"),
                "peak_ratio_chunk64_over_16": memory_ratio, "images_per_s": 64 / gpu_stats["wall"]}


def check_full_stack(inputs: Inputs, args) -> tuple[bool, dict]:
    import bench_extract

    figures = bench_extract.main(["--images", "64", "--device", args.device, "--detector", "fasterrcnn",
                                  "--encoder", "clip", "--encoder", "resnet152", "--encoder", "swin",
                                  "--batch-size", "32", "--chunk-size", "64", "--detector-min-size", "480"])
    return figures["end_to_end_images_per_s"] > 0, figures


def check_precision_step(inputs: Inputs, args) -> tuple[bool, dict]:
    import bench_precision

    figures = bench_precision.main(["--device", args.device, "--data", str(inputs.data), "--model", "bert_crf",
                                    "--text-encoder", "minilm-l6", "--epochs", "3", "--repeats", "1"])
    return True, figures


CHECKS = [  # name, function, needs a GPU, runs in --quick
    ("train_presets", check_train_presets, False, True),
    ("train_fp16", check_train_fp16, True, False),
    ("resume", check_resume, False, True),
    ("ddp", check_ddp, False, False),
    ("fast_ablation_memory", check_fast_ablation_memory, True, False),
    ("stage1_cpu_vs_gpu", check_stage1, True, False),
    ("full_stack", check_full_stack, True, False),
    ("precision_step", check_precision_step, True, False),
]


def environment(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--quick", action="store_true", help="the fast form the test suite runs (CPU)")
    parser.add_argument("--only", action="append", help="run only these checks (repeatable)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON of figures and pass/fail lines")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--ddp-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    import torch

    if args.mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu: torch sees no CUDA GPU here; run --mode cpu")
    args.device = "cuda:0" if args.mode == "gpu" else "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {"environment": environment(args.device), "mode": args.mode, "quick": args.quick, "checks": {},
              "lines": []}
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        inputs = Inputs(work)
        for name, check, needs_gpu, in_quick in CHECKS:
            if args.only and name not in args.only:
                continue
            if needs_gpu and args.mode != "gpu":
                status, figures = "skip", {"why": "needs a CUDA GPU (docs/gpu.md)"}
            elif args.quick and not in_quick:
                status, figures = "skip", {"why": "not in --quick (tests/test_resume.py runs the DDP check)"}
            else:
                started = time.perf_counter()
                try:
                    ok, figures = check(inputs, args)
                    status = "pass" if ok else "fail"
                except Exception as err:  # one broken check must not hide the others' figures
                    status, figures = "fail", {"error": f"{type(err).__name__}: {err}",
                                               "traceback": traceback.format_exc()[-3000:]}
                figures["seconds"] = round(time.perf_counter() - started, 1)
            report["checks"][name] = {"status": status, **figures}
            report["lines"].append(f"{status.upper():4} {name}")
            print(f"{status.upper():4} {name}", flush=True)
            save()
    report["passed"] = all(c["status"] != "fail" for c in report["checks"].values())
    save()
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
