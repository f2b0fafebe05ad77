"""The training engine: Hugging Face ``accelerate`` for device placement, autocast, DDP and gradient
accumulation; checkpoints written by mner itself so that every state a resumed run needs is explicit.

One process on a CPU or one GPU; ``torchrun --nproc_per_node N -m mner.trainer.cli ...`` (or
``accelerate launch``) starts N processes that train one DDP model (NCCL on GPUs, gloo on CPUs).
Every process decodes the full dev set with identical weights; process 0's dev F1 decides the best
epoch and early stopping for all (``Engine.agree``, which also records whether the processes' weights,
buffers and dev F1 were identical); only process 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mner.pipeline.background import BackgroundWriter
from mner.trainer.core.config import ConfigError

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# The process-group backend for several processes; unset: accelerate's choice (NCCL on GPUs, gloo on CPUs).
# ``gloo`` lets two processes share one GPU (NCCL refuses two ranks on one device): bench/gpu_check.sh.
DDP_BACKEND_ENV = "MNER_DDP_BACKEND"
LOSS_READ_EVERY = 10  # GPU training steps between two reads of the losses on the host (each one waits for the device)
# Test-only: the process SIGKILLs itself at this global training step (1-based); see tests/test_resume.py.
KILL_AT_STEP_ENV = "MNER_TEST_SIGKILL_AT_STEP"


def cuda_bf16_native() -> bool:
    """The GPU computes bf16 in hardware (Ampere and later). ``torch.cuda.is_bf16_supported()`` also
    counts emulation by default (V100, T4), which is slower than fp16 there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation (and no emulation either)
        return torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, *, on_cuda: bool) -> str:
    """``auto`` -> bf16 on CUDA where the GPU has it in hardware (else fp16), fp32 on CPU; impossible
    requests are errors. An explicit ``bf16`` also runs on GPUs that only emulate it."""
    if precision == "auto":
        if not on_cuda:
            return "fp32"
        return "bf16" if cuda_bf16_native() else "fp16"
    if precision == "fp16" and not on_cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU (fp16 autocast with loss scaling); "
                          "use bf16 or fp32 on CPU")
    if precision == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bf16 support; use fp16 or fp32")
    return precision


def check_device_and_precision(device: str, precision: str) -> str:
    """The precision a run will use, checked against the device before anything is loaded."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    return resolve_precision(precision, on_cuda=device != "cpu" and torch.cuda.is_available())


def distributed_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state = {"python": random.getstate(), "numpy": numpy_state,
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_copy(tree, buffers: dict | None = None, path: tuple = ()):
    """Tensors of a (nested) state dict copied to CPU memory, so later steps cannot change them.

    ``buffers`` keeps the copies between calls and refills them in place: allocating and first
    touching a few hundred MB each epoch costs more than copying them."""
    if isinstance(tree, torch.Tensor):
        tensor = tree.detach()
        buffer = None if buffers is None else buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = tensor.to("cpu", copy=True)
            if buffers is not None:
                buffers[path] = buffer
            return buffer
        return buffer.copy_(tensor)
    if isinstance(tree, dict):
        return {key: cpu_copy(value, buffers, (*path, key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(value, buffers, (*path, i)) for i, value in enumerate(tree))
    return copy.deepcopy(tree)


def split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """An optimiser state dict as (flat tensors for safetensors, everything else)."""
    tensors, rest_state = {}, {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value.contiguous()
            else:
                rest_state.setdefault(index, {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": rest_state,
                     "indices": list(state_dict["state"])}


def join_optimizer_state(tensors: dict, rest: dict) -> dict:
    state = {index: dict(rest["state"].get(index, {})) for index in rest["indices"]}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state[int(index) if index.lstrip("-").isdigit() else index][name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


class NonFiniteLoss(Exception):
    """The training loss became NaN or Inf: the step, the batch and what the batch held (see ``likely_cause``)."""

    def __init__(self, step: int, loss: float, batch: dict, model):
        self.step, self.loss = step, loss
        index = batch.get("post_index")
        self.post_indices = [int(i) for i in index.tolist()] if isinstance(index, torch.Tensor) else []
        self.bad_rows: list[int] = []  # batch rows whose cached features are not finite
        self.cause = likely_cause(batch, model, self.bad_rows)
        super().__init__(f"training loss is {loss} at step {step}")


def likely_cause(batch: dict, model, bad_rows: list[int]) -> str:
    """Why a loss is not finite, from what can be checked cheaply after the fact."""
    bad_inputs = []
    for key, value in (batch.get("visual") or {}).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1:
            finite = torch.isfinite(value).reshape(value.shape[0], -1).all(dim=1)  # (B,)
            if not bool(finite.all()):
                bad_inputs.append(key)
                bad_rows.extend(int(i) for i in torch.nonzero(~finite).flatten().tolist() if i not in bad_rows)
    bad_rows.sort()
    if bad_inputs:
        return (f"the batch's cached features hold NaN/Inf ({', '.join(bad_inputs)}): check the cache with "
                "`mner-features verify CACHE` and re-extract the images named")
    if any(not bool(torch.isfinite(p).all()) for p in model.parameters()):
        return ("the model's weights became non-finite at an earlier step: the learning rates are too high "
                "(lower --head-lr / --encoder-lr / --crf-lr) or fp16 overflowed (use --precision bf16 or fp32)")
    return ("the loss overflowed on finite inputs and weights: lower the learning rates, or use --precision fp32 "
            "(fp16/bf16 overflow)")


class Engine:
    """An ``accelerate.Accelerator`` configured from the train options, plus the epoch loop and checkpoints."""

    def __init__(self, *, device: str, precision: str, grad_accum: int, log_with: list[str] | None = None,
                 project_dir: str | Path | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        distributed = distributed_world_size() > 1
        if not distributed or not torch.distributed.is_initialized():
            # one process may train several runs; the previous run's end_training closed its process group
            AcceleratorState._reset_state(reset_partial_state=True)
        if not distributed and device.startswith("cuda:"):
            torch.cuda.set_device(int(device.split(":")[1]))  # cuda:N: every allocation, event and stream there
        cpu = device == "cpu" or not torch.cuda.is_available()
        self.precision = resolve_precision(precision, on_cuda=not cpu)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=MIXED_PRECISION[self.precision], gradient_accumulation_steps=grad_accum,
            # ablation switches leave some parameters unused in forward; DDP must not wait for their gradients
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True),
                             *([InitProcessGroupKwargs(backend=os.environ[DDP_BACKEND_ENV])]
                               if os.environ.get(DDP_BACKEND_ENV) else [])],
            log_with=log_with, project_dir=None if project_dir is None else str(project_dir),  # live tracking
        )
        self.grad_accum = grad_accum
        self.global_step = 0  # batches seen by this process since the run started (the test kill hook counts them)
        self._kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
        self.writer = BackgroundWriter(pending=1, name="mner-checkpoint")  # one checkpoint write at a time
        self._buffers: dict = {}  # CPU copies reused by every snapshot

    # ------------------------------------------------------------------ facts about the processes
    @property
    def device(self) -> torch.device:
        """The run's device with its index (``cuda:N``, never a bare ``cuda`` that would mean GPU 0 to
        some libraries)."""
        device = self.accelerator.device
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def autocast(self):
        return self.accelerator.autocast()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def prepare(self, model, optimizer, loader):
        """Moves the model, wraps it in DDP when there are several processes and makes the loader's
        batches arrive on the device; the scheduler stays outside (stepped once per optimiser step).

        The loader is already this process's share (its batch sampler takes ``rank`` and ``world_size``,
        see :class:`mner.trainer.inputs.batching.LengthGroupedBatchSampler`), so accelerate must not shard
        it again: its batch sharding skips a group of batches whenever a short batch ends a group, and
        pads the last group with repeated posts."""
        from accelerate.data_loader import prepare_data_loader

        model, optimizer = self.accelerator.prepare(model, optimizer)
        loader = prepare_data_loader(loader, self.device, num_processes=1, process_index=0, put_on_device=True,
                                     non_blocking=self.device.type == "cuda")
        return model, optimizer, loader

    def optimizer_steps_per_epoch(self, loader) -> int:
        return -(-len(loader) // self.grad_accum)

    def peak_memory_mb(self) -> dict:
        peak = {"process_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if self.device.type == "cuda":
            peak["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return peak

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, model, loader, optimizer, scheduler, *, max_grad_norm: float, desc: str,
                    on_step: Callable[[int], None] | None = None, tracker=None) -> float:
        """One pass over ``loader``; returns the mean training loss over all processes. ``tracker``
        (trainer/core/tracking.py) gets each batch's loss, learning rates and gradient norm, once per
        window of steps (when the losses are read anyway)."""
        accelerator = self.accelerator
        model.train()
        # The losses are read on the host once per window of steps: every step on a CPU (where reading costs
        # nothing), every LOSS_READ_EVERY steps on a GPU, where a ``loss.item()`` per step makes the CPU wait
        # for the GPU and starves its queue. The window's batches are kept until then, so a non-finite loss
        # still names its own step and batch; several processes agree on stopping once per window.
        read_every = 1 if self.device.type == "cpu" else LOSS_READ_EVERY
        window: list[tuple[int, torch.Tensor, dict]] = []  # (global step, loss on the device, batch)
        tracked: list[tuple[dict, torch.Tensor | None]] = []  # per window step: learning rates, gradient norm
        tracking = tracker is not None and tracker.active
        loss_sum, steps = 0.0, 0
        bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=not self.is_main)
        last = len(loader)
        for batch in bar:
            self.global_step += 1
            if self._kill_at and self.global_step == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if on_step is not None:
                on_step(self.global_step)
            with accelerator.accumulate(model):
                loss = model(batch)["loss"]
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and (max_grad_norm > 0 or tracking):  # inf: measure, do not clip
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
                if tracking:
                    tracked.append((tracker.learning_rates(optimizer), grad_norm))  # the rates this step uses
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append((self.global_step, loss.detach(), batch))
            steps += 1
            if len(window) == read_every or steps == last:
                loss_sum += self._read_losses(window, model)
                if tracking:
                    tracker.steps(window, tracked)
                window, tracked = [], []
                bar.set_postfix(loss=f"{loss_sum / steps:.3f}")
        if window:  # a loader shorter than it said
            loss_sum += self._read_losses(window, model)
            if tracking:
                tracker.steps(window, tracked)
        mean = torch.tensor(loss_sum / max(steps, 1), device=self.device)
        return float(accelerator.reduce(mean, "mean")) if self.world_size > 1 else float(mean)

    def _read_losses(self, window: list[tuple[int, torch.Tensor, dict]], model) -> float:
        """The window's losses on the host (one copy); raises NonFiniteLoss at its first non-finite one,
        on every process when any process has one (so none waits in a later all-reduce)."""
        values = torch.stack([loss.float() for _, loss, _ in window]).tolist()
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        diverged = bad is not None
        if self.world_size > 1:
            diverged = bool(self.accelerator.reduce(torch.tensor(float(diverged), device=self.device), "sum") > 0)
        if diverged:
            step, _, batch = window[bad if bad is not None else -1]
            raise NonFiniteLoss(step, values[bad] if bad is not None else float("nan"), batch, model)
        return float(sum(values))

    # ------------------------------------------------------------------ agreement between processes
    def agree(self, model, dev_f1: float) -> tuple[float, dict]:
        """Process 0's dev F1, which every process then uses for its best-epoch and early-stopping
        decisions (so all stop at the same epoch and no collective call waits forever), and a record
        of whether the processes agreed: their dev F1s and a fingerprint of their weights and buffers
        (one float64 sum per tensor) must be identical. One small all-gather per epoch."""
        if self.world_size == 1:
            return dev_f1, {}
        from accelerate.utils import gather_object

        state = self.unwrap(model).state_dict()
        fingerprint = [float(t.detach().double().sum()) for t in state.values() if t.is_floating_point()]
        rows = gather_object([(dev_f1, fingerprint)])
        f1s = [row[0] for row in rows]
        same_weights = all(row[1] == rows[0][1] for row in rows)
        return f1s[0], {"dev_f1_by_rank": f1s, "replicas_agree": same_weights and len(set(f1s)) == 1}

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self, model, optimizer, scheduler) -> dict | None:
        """A CPU copy of everything a checkpoint holds (process 0; None elsewhere), taken between two
        steps so that writing it can overlap the next epoch. RNG states come from every process."""
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state()]) if self.world_size > 1 else [rng_state()]
        if not self.is_main:
            return None
        self.writer.wait()  # the previous write has finished with the buffers
        snapshot = {"model": cpu_copy(self.unwrap(model).state_dict(), self._buffers, ("model",)),
                    "optimizer": cpu_copy(optimizer.state_dict(), self._buffers, ("optimizer",)),
                    "scheduler": copy.deepcopy(scheduler.state_dict()), "rng": rngs}
        if self.accelerator.scaler is not None:
            snapshot["scaler"] = copy.deepcopy(self.accelerator.scaler.state_dict())
        return snapshot

    @staticmethod
    def write_snapshot(snapshot: dict, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(snapshot["model"], str(folder / "model.safetensors"))
        # optimiser moments through safetensors (5x less CPU than torch.save's zip), the rest as a small pickle
        tensors, rest = split_optimizer_state(snapshot["optimizer"])
        save_file(tensors, str(folder / "optimizer.safetensors"))
        torch.save(rest, folder / "optimizer.pt")
        torch.save(snapshot["scheduler"], folder / "scheduler.pt")
        if "scaler" in snapshot:
            torch.save(snapshot["scaler"], folder / "scaler.pt")
        for rank, state in enumerate(snapshot["rng"]):
            torch.save(state, folder / f"rng-{rank}.pt")

    def load_weights(self, model, path: Path) -> None:
        """Weights read into host memory and copied into the model's parameters wherever they live
        (``cuda:N`` included: nothing is allocated on another GPU first)."""
        from safetensors.torch import load_file

        self.unwrap(model).load_state_dict(load_file(str(path), device="cpu"))

    def load_checkpoint(self, folder: Path, model, optimizer, scheduler) -> None:
        from safetensors.torch import load_file

        self.load_weights(model, folder / "model.safetensors")
        # read on the CPU: torch's load_state_dict moves the moments to their parameter's device and keeps
        # AdamW's ``step`` counters on the CPU (loaded onto a GPU, every later step would sync on them)
        tensors = load_file(str(folder / "optimizer.safetensors"), device="cpu")
        optimizer.load_state_dict(join_optimizer_state(tensors, torch.load(folder / "optimizer.pt", weights_only=True)))
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if self.accelerator.scaler is not None and (folder / "scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        rng_file = folder / f"rng-{self.accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise ConfigError(f"{folder} has no RNG state for process {self.accelerator.process_index}: "
                              "resume with as many processes as the run was started with")
        set_rng_state(torch.load(rng_file, weights_only=True))

    def end(self) -> None:
        self.writer.wait()
        self.writer.close()
        with contextlib.suppress(Exception):
            self.accelerator.end_training()
