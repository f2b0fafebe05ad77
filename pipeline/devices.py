"""``--device`` for both stages: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, checked against the GPUs
torch sees and torchrun's LOCAL_RANK (one GPU per process). torch is imported only to count the GPUs."""

from __future__ import annotations

import os
from collections.abc import Mapping

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


class DeviceError(ValueError):
    """A ``--device`` this machine or this process cannot use; the message names the fix."""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str, env: Mapping[str, str] | None = None, *, cuda_count: int | None = None) -> str:
    """``auto`` -> ``cuda:<LOCAL_RANK>`` when a GPU is visible, else ``cpu``; ``cuda`` takes the local rank.

    An explicit ``cuda:N`` is kept, but under torchrun it must match LOCAL_RANK (every rank on one GPU
    is the mistake this guards against). A process that sees exactly one GPU takes it (``cuda:0``)
    whatever its LOCAL_RANK: launchers that give each rank its own GPU (``CUDA_VISIBLE_DEVICES`` per
    rank, SLURM ``--gpus-per-task=1``) show every rank one device."""
    env = os.environ if env is None else env
    cuda_count = visible_gpus() if cuda_count is None else cuda_count
    local_rank = None
    if "LOCAL_RANK" in env:
        try:
            local_rank = int(env["LOCAL_RANK"])
        except ValueError:
            raise DeviceError(f"LOCAL_RANK={env['LOCAL_RANK']!r} is not an integer") from None
    if device == "auto":
        if cuda_count == 0:
            return "cpu"
        device = "cuda"
    if device.startswith("cuda") and cuda_count == 0:
        raise DeviceError(f"--device {device}: torch sees 0 GPUs here; use --device cpu or auto")
    if cuda_count == 1 and device in ("cuda", "cuda:0"):
        return "cuda:0"  # one visible GPU: this rank's own (or, on a one-GPU machine, shared by the ranks)
    if device == "cuda":
        index = local_rank or 0
        if index >= cuda_count:
            raise DeviceError(
                f"--device cuda: LOCAL_RANK {index} but torch sees {cuda_count} GPU(s); "
                "use --nproc-per-node <= the GPU count, or --device cpu"
            )
        return f"cuda:{index}"
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1]) if device.split(":", 1)[1].isdigit() else -1
        if not 0 <= index < cuda_count:
            raise DeviceError(
                f"--device {device}: torch sees {cuda_count} GPU(s) (valid: auto, cpu, cuda, cuda:0..{cuda_count - 1})"
            )
        if local_rank is not None and index != local_rank:
            raise DeviceError(
                f"--device {device} under torchrun LOCAL_RANK {local_rank}: every rank would share "
                "one GPU; use --device auto (or cuda) to take the local rank's GPU"
            )
        return device
    if device in ("cpu", "mps") or device.startswith("mps:"):
        return device
    raise DeviceError(f"--device {device!r}; valid: {DEVICE_CHOICES}")


def use_device(device: str) -> None:
    """Make a ``cuda:N`` device this process's current CUDA device.

    Without it, everything that takes "the current device" -- CUDA events, ``torch.cuda.synchronize()``,
    the DataLoader's pin-memory thread, a bare ``"cuda"`` -- works on GPU 0: ``--device cuda:1`` would
    time GPU 0 and open a second context there. CPU and MPS need nothing."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
