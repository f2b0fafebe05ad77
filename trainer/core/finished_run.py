"""A finished run rebuilt from its folder (evaluate, predict, the Tagger)."""

from __future__ import annotations

from pathlib import Path

import torch

from mner.pipeline.devices import resolve_device
from mner.trainer.core.console import log
from mner.trainer.core.run_folder import RunFolderError, read_run_config, require_finished, verify_weights
from mner.trainer.core.schema2_runs import is_schema2_run, upgrade_schema2_run
from mner.trainer.core.training import build_model
from mner.trainer.inputs.text_encoder import load_tokenizer
from mner.trainer.inputs.visual_inputs import open_visual_inputs
from mner.trainer.models import get_model_class


def load_run(run_dir: str | Path, *, features: str | Path | None = None, device: str = "auto"):
    """Rebuild a trained model from its finished run directory: (model, run config, tokenizer, visual
    inputs, device). The encoder is built from the run's own ``text_encoder/`` skeleton, so the run
    keeps working after the original encoder folder moved or without network. A run trained on a
    schema-2 cache reads the instances the same models made (``schema2_runs``)."""
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    require_finished(run_dir)
    run_config = read_run_config(run_dir)
    verify_weights(run_dir)
    if is_schema2_run(run_config):
        run_config, mapped = upgrade_schema2_run(run_dir, run_config, features)
        for line in mapped:
            log(f"{run_dir} (trained on a schema-2 cache) reads {line}")
    model_cls = get_model_class(run_config["model"])
    model_config = model_cls.Config(**run_config["model_config"])
    use_placeholders = run_config.get("train_config", {}).get("use_placeholder_features", False)
    visual = open_visual_inputs(
        features, model_cls, model_config, run_config["model"], use_placeholders=use_placeholders
    )
    if visual is not None:
        model_config = visual.model_config
    skeleton = run_dir / "text_encoder"
    encoder = str(skeleton) if skeleton.is_dir() else run_config["text_encoder"]["name"]
    tokenizer = load_tokenizer(encoder)
    torch_device = torch.device(resolve_device(device))
    net = build_model(model_cls, model_config, labels=run_config["labels"], text_encoder=encoder,
                      tokenizer=tokenizer, visual=visual)
    if run_config.get("gmner"):  # trained with --boxes: the grounding head as it was sized then
        from mner.trainer.gmner.head import rebuild_grounded

        net = rebuild_grounded(net, run_config)
    try:
        load_model(net, str(run_dir / "model.safetensors"), device="cpu")
    except Exception as err:  # a truncated or foreign file (runs from before weights_sha256 was recorded)
        raise RunFolderError(f"{run_dir / 'model.safetensors'} does not load ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:80] if str(err) else ''}); restore it or train the run "
                             "again") from None
    return net.to(torch_device), run_config, tokenizer, visual, torch_device
