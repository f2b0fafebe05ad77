"""The stage-2 training loop: ``train(...) -> run directory``.

A run directory is written as ``<out>.tmp-<pid>`` and renamed to ``<out>`` only when everything
is in it, so a killed run never leaves a half-written run behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mner.pipeline.data import Dataset, Post, load_dataset
from mner.trainer.batching import Collator, LengthGroupedBatchSampler, PostDataset
from mner.trainer.config import ConfigError, TrainConfig, resolve_configs
from mner.trainer.evaluate import entity_scores, format_scores, write_conll, write_json, write_parquet
from mner.trainer.models import get_model_class
from mner.trainer.text_encoder import load_tokenizer, resolve_text_encoder
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

SPLITS = ("train", "dev", "test")


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def warn_loudly(message: str) -> None:
    bar = "!" * 78
    log(f"{bar}\nWARNING: {message}\n{bar}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"--device {name!r}: valid values: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def to_device(batch: dict, device: torch.device) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            moved[key] = to_device(value, device)
        else:
            moved[key] = value
    return moved


# ----------------------------------------------------------------------------- inputs


def load_posts(data: str | Path | None, features: str | Path | None, *, require_tags: bool = True) -> tuple[Dataset, dict]:
    """Posts from ``--data`` or, when only ``--features`` is given, from the posts stored in the cache."""
    if data is not None:
        dataset = load_dataset(data, require_tags=require_tags)
        return dataset, {"source": "data", "path": str(Path(data).resolve())}
    if features is not None:
        from mner.pipeline.cache import FeatureCache

        dataset = FeatureCache(features).load_posts()
        return dataset, {"source": "features", "path": str(Path(features).resolve())}
    raise ConfigError("no data: pass --data DIR (split files) or --features CACHE.h5 (posts stored in the cache)")


def cache_summary(cache) -> dict:
    """Short provenance of every feature group: enough to tell which weights made the features."""
    from mner.pipeline.cache import CacheError

    summary = {}
    for group in sorted(cache.groups()):
        try:
            provenance = cache.provenance(group)
        except CacheError:  # a group without provenance is reported, not fatal
            provenance = {}
        summary[group] = {k: provenance.get(k) for k in ("component", "model", "pretrained", "created")}
    return summary


class VisualInputs:
    """The cache, the model's FeatureSpec and the VisualBatcher for a model that needs features."""

    def __init__(
        self, features: str | Path, required: list[str], model_name: str, *,
        max_objects: int | None = None, use_placeholders: bool = False,
    ):
        from mner.pipeline.cache import FeatureCache
        from mner.trainer.visual import VisualBatcher  # lazy: text-only runs never touch it

        self.path = str(Path(features).resolve())
        self.cache = FeatureCache(features)
        self.cache.require(required, model_name)
        self.required = list(required)
        self.spec = self.cache.feature_spec(required)
        # read and pad only the objects the model attends to (its top-m), not every cached detection
        self.batcher = VisualBatcher(
            self.cache, required, max_objects=max_objects, use_placeholders=use_placeholders
        )
        self.random_init = sorted(self.cache.random_init_groups())

    def image_rows(self, posts: Sequence[Post]) -> tuple[list[int | None], int]:
        rows: list[int | None] = []
        missing = 0
        for post in posts:
            row = None
            if post.image_id is not None:
                try:
                    row = self.cache.row_of(post.image_id)
                except KeyError:
                    row = None
                missing += row is None
            rows.append(row)
        return rows, missing


def open_visual_inputs(
    features, model_cls, model_config, model_name: str, *, use_placeholders: bool = False
) -> VisualInputs | None:
    required = list(model_cls.required_features(model_config))
    if not required:
        return None
    if features is None:
        from mner.pipeline.cache import extract_command_hint

        raise ConfigError(
            f"model {model_name!r} reads cached visual features ({', '.join(required)}); pass "
            f"--features CACHE.h5. Build one with: {extract_command_hint(required)}"
        )
    max_objects = getattr(model_config, "max_objects", None)
    return VisualInputs(
        features, required, model_name, max_objects=max_objects, use_placeholders=use_placeholders
    )


def build_model(model_cls, model_config, *, labels, text_encoder: str, tokenizer, visual: VisualInputs | None):
    return model_cls(
        model_config, labels=labels, text_encoder=resolve_text_encoder(text_encoder), tokenizer=tokenizer,
        features=visual.spec if visual is not None else None,
    )


def make_post_dataset(posts, tokenizer, *, label_to_id, max_length, visual, split, repair=False) -> PostDataset:
    image_rows = None
    if visual is not None:
        image_rows, missing = visual.image_rows(posts)
        if missing:
            log(f"{split}: {missing} posts name an image the cache does not hold; their visual input is zeros")
    dataset = PostDataset(
        posts, tokenizer, label_to_id=label_to_id, max_length=max_length, image_rows=image_rows, repair=repair
    )
    message = dataset.report.message(f"{split} posts")
    if message:
        log(f"WARNING {split}: {message}")
    return dataset


def make_loader(dataset: PostDataset, collator: Collator, *, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, group_by_length: bool = False) -> DataLoader:
    if shuffle and group_by_length:
        lengths = [len(a.input_ids) for a in dataset.aligned]
        return DataLoader(dataset, batch_sampler=LengthGroupedBatchSampler(lengths, batch_size, seed=seed),
                          collate_fn=collator, num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, num_workers=num_workers,
        generator=generator, persistent_workers=False,
    )


# ----------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_tags(model, dataset: PostDataset, collator: Collator, *, labels: list[str], device: torch.device,
                 batch_size: int, num_workers: int = 0, desc: str = "decode") -> list[list[str]]:
    """One tag per word of every post; words the model cannot see (word_mask False) are ``O``."""
    model.eval()
    loader = make_loader(dataset, collator, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    predictions: list[list[str]] = []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    for batch in bar:
        word_mask = batch["word_mask"]
        paths = model.decode(to_device(batch, device))
        for row, path in enumerate(paths):
            n_words = len(dataset.posts[len(predictions)].tokens)
            kept = word_mask[row, :n_words].tolist()
            if sum(kept) != len(path):
                raise RuntimeError(f"model decoded {len(path)} tags for a post with {sum(kept)} kept words")
            tags = iter(labels[i] for i in path)
            predictions.append([next(tags) if keep else "O" for keep in kept])
    return predictions


def score_split(posts: Sequence[Post], predictions: list[list[str]]) -> dict:
    return entity_scores([list(p.tags) for p in posts], predictions)


# ----------------------------------------------------------------------------- optimisation


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """Encoder / head / CRF learning rates; no weight decay on biases and norm weights (1-d tensors)."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "text_encoder" if name.startswith("text_encoder.") else "crf" if name.startswith("crf.") else "head"
        groups.setdefault((part, param.ndim > 1), []).append(param)
    lrs = {"text_encoder": config.encoder_lr, "head": config.head_lr, "crf": config.crf_lr}
    return [
        {"params": params, "lr": lrs[part], "weight_decay": config.weight_decay if decay else 0.0,
         "name": f"{part}{'' if decay else '/no_decay'}"}
        for (part, decay), params in sorted(groups.items())
    ]


# ----------------------------------------------------------------------------- run directory


def _temp_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.tmp-{os.getpid()}"


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} appeared while training; the finished run is kept in {tmp}")
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def train(
    *,
    out: str | Path,
    model: str = "bert_crf",
    data: str | Path | None = None,
    features: str | Path | None = None,
    preset: str | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train one model and return its finished run directory.

    ``flags`` holds explicit command-line values for TrainConfig fields (None = not given); they
    override the preset and ``--set`` (see :mod:`mner.trainer.config`).
    """
    from safetensors.torch import load_model, save_model

    started = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"run directory {out} exists; pass --overwrite to replace it or choose another --out")
    model_cls = get_model_class(model)
    model_config, config = resolve_configs(model_cls, preset=preset, sets=sets, flags=flags)
    device = resolve_device(config.device)
    seed_everything(config.seed)

    dataset, data_info = load_posts(data, features)
    for split in ("train", "dev"):
        if not dataset.splits.get(split):
            raise ConfigError(f"{data_info['path']}: no {split} posts; training needs train and dev splits")
    labels = dataset.labels
    label_to_id = {label: i for i, label in enumerate(labels)}
    visual = open_visual_inputs(
        features, model_cls, model_config, model, use_placeholders=config.use_placeholder_features
    )
    if visual is not None and visual.random_init:
        warn_loudly(
            f"the feature cache {visual.path} holds features from RANDOMLY INITIALISED weights "
            f"({', '.join(visual.random_init)}): fine for smoke tests, meaningless for results"
        )
    cache_info = None
    if features is not None:
        from mner.pipeline.cache import FeatureCache

        cache_info = {"path": str(Path(features).resolve()),
                      "required": visual.required if visual is not None else [],
                      "provenance": cache_summary(visual.cache if visual is not None else FeatureCache(features))}

    tokenizer = load_tokenizer(config.text_encoder)
    train_posts = dataset.splits["train"]
    if config.train_fraction < 1.0:  # low-resource: nested subsets per seed (10% inside 20% ...)
        from mner.trainer.protocols import train_subset

        train_posts = [train_posts[i] for i in train_subset(len(train_posts), config.train_fraction, config.seed)]
    common = {"tokenizer": tokenizer, "label_to_id": label_to_id, "max_length": config.max_length, "visual": visual}
    train_set = make_post_dataset(train_posts, split="train", repair=True, **common)
    log(f"train: repaired {train_set.repaired} orphan I- tags to B- for training (evaluation keeps them)")
    eval_sets = {split: make_post_dataset(dataset.splits[split], split=split, **common)
                 for split in ("dev", "test") if dataset.splits.get(split)}
    collator = Collator(pad_token_id=tokenizer.pad_token_id or 0,
                        visual_batcher=visual.batcher if visual is not None else None)

    net = build_model(model_cls, model_config, labels=labels, text_encoder=config.text_encoder,
                      tokenizer=tokenizer, visual=visual).to(device)
    if config.fast_ablation:  # not the papers' protocol: frozen encoder, outputs computed once
        from mner.trainer.fast_text import use_cached_text_encoder

        use_cached_text_encoder(net, [train_set, *eval_sets.values()], device=device,
                                batch_size=config.eval_batch_size)
    train_loader = make_loader(train_set, collator, batch_size=config.batch_size, shuffle=True,
                               num_workers=config.num_workers, seed=config.seed,
                               group_by_length=config.group_by_length)
    optimizer = torch.optim.AdamW(parameter_groups(net, config))
    from transformers import get_linear_schedule_with_warmup

    total_steps = max(1, len(train_loader) * config.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)

    tmp = _temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run_config = {
        "model": model,
        "preset": preset,
        "sets": list(sets or []),
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(config),
        "labels": labels,
        "label_map": label_to_id,
        "text_encoder": {"name": config.text_encoder, "path": resolve_text_encoder(config.text_encoder)},
        "data": {**data_info, "hash": dataset.data_hash, "files": dataset.files, "notes": dataset.notes},
        "features": cache_info,
        "device": str(device),
    }
    write_json(tmp / "config.json", run_config)
    write_json(tmp / "labels.json", {"labels": labels})

    history: list[dict] = []
    best_f1, best_epoch, epochs_without_gain = -1.0, 0, 0
    log(f"training {model} on {len(train_set)} posts, {len(train_loader)} steps/epoch, device {device}")
    epoch_bar = tqdm(range(1, config.epochs + 1), desc="epochs", dynamic_ncols=True, file=sys.stderr)
    for epoch in epoch_bar:
        epoch_start = time.time()
        net.train()
        loss_sum, steps = 0.0, 0
        step_bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, file=sys.stderr)
        for batch in step_bar:
            loss = net(to_device(batch, device))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            steps += 1
            step_bar.set_postfix(loss=f"{loss_sum / steps:.3f}")
        train_seconds = time.time() - epoch_start
        dev_pred = predict_tags(net, eval_sets["dev"], collator, labels=labels, device=device,
                                batch_size=config.eval_batch_size, num_workers=config.num_workers, desc="dev")
        dev_f1 = score_split(eval_sets["dev"].posts, dev_pred)["micro"]["f1"]
        improved = dev_f1 > best_f1
        if improved:
            best_f1, best_epoch, epochs_without_gain = dev_f1, epoch, 0
            save_model(net, str(tmp / "model.safetensors"))
            os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates it owner-only
        else:
            epochs_without_gain += 1
        history.append({"epoch": epoch, "loss": loss_sum / max(steps, 1), "dev_f1": dev_f1,
                        "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - epoch_start, 1)})
        epoch_bar.set_postfix(loss=f"{loss_sum / max(steps, 1):.3f}", dev_f1=f"{100 * dev_f1:.2f}",
                              best=f"{100 * best_f1:.2f}@{best_epoch}")
        log(f"epoch {epoch}: loss {loss_sum / max(steps, 1):.4f}  dev F1 {100 * dev_f1:.2f}"
            f"{'  (best)' if improved else ''}  {time.time() - epoch_start:.0f}s")
        if config.patience and epochs_without_gain >= config.patience:
            log(f"early stop: no better dev F1 for {config.patience} epochs")
            break
    epoch_bar.close()

    load_model(net, str(tmp / "model.safetensors"), device=str(device))
    metrics: dict[str, Any] = {
        "model": model, "preset": preset, "best_epoch": best_epoch, "epochs_run": len(history),
        "data_hash": dataset.data_hash, "data_source": data_info, "orphan_i": dataset.orphan_i,
        "repaired_train_tags": train_set.repaired,
    }
    for split, eval_set in eval_sets.items():
        pred = predict_tags(net, eval_set, collator, labels=labels, device=device,
                            batch_size=config.eval_batch_size, num_workers=config.num_workers, desc=split)
        scores = score_split(eval_set.posts, pred)
        metrics[split] = scores
        write_conll(tmp / "predictions" / f"{split}.conll", eval_set.posts, pred)
        write_parquet(tmp / "predictions" / f"{split}.parquet", eval_set.posts, pred)
        log(format_scores(scores, f"{split} (best epoch {best_epoch})"))
    metrics["alignment"] = {
        split: {"words": ds.report.words, "zero_piece": ds.report.zero_piece, "truncated": ds.report.truncated}
        for split, ds in [("train", train_set), *eval_sets.items()]
    }
    if visual is not None:
        metrics["random_init_features"] = visual.random_init
    metrics["history"] = history
    metrics["seconds"] = round(time.time() - started, 1)
    write_json(tmp / "metrics.json", metrics)
    _publish(tmp, out, overwrite)
    log(f"run written to {out}")
    return out


# ----------------------------------------------------------------------------- finished runs


def load_run(run_dir: str | Path, *, features: str | Path | None = None, device: str = "auto"):
    """Rebuild a trained model from its run directory: (model, run config, tokenizer, visual inputs, device)."""
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no config.json); train one with mner-train")
    run_config = json.loads(config_path.read_text(encoding="utf-8"))
    model_cls = get_model_class(run_config["model"])
    model_config = model_cls.Config(**run_config["model_config"])
    if features is None and run_config.get("features"):
        features = run_config["features"]["path"]
    use_placeholders = run_config.get("train_config", {}).get("use_placeholder_features", False)
    visual = open_visual_inputs(
        features, model_cls, model_config, run_config["model"], use_placeholders=use_placeholders
    )
    tokenizer = load_tokenizer(run_config["text_encoder"]["name"])
    torch_device = resolve_device(device)
    net = build_model(model_cls, model_config, labels=run_config["labels"],
                      text_encoder=run_config["text_encoder"]["name"], tokenizer=tokenizer, visual=visual)
    load_model(net, str(run_dir / "model.safetensors"), device="cpu")
    return net.to(torch_device), run_config, tokenizer, visual, torch_device
