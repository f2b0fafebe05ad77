"""``mner-train`` in forked processes: killable runs, and DDP groups like torchrun's workers (gloo on a
CPU; ``MNER_DDP_BACKEND=gloo`` lets two share one GPU). Used by tests/test_resume.py and bench/gpu_check.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mner.trainer.cli import main


def _record_training_posts(record: str):
    """In a forked worker: note the index of every training post that each epoch reads (appended to
    ``record`` as one JSON line per run), by wrapping the dataset and the engine's epoch."""
    from mner.trainer.core.engine import Engine
    from mner.trainer.inputs.batching import PostDataset

    epochs: list[list[int]] = []
    training = []
    train_epoch, get_item = Engine.train_epoch, PostDataset.__getitem__

    def recorded_epoch(self, *args, **kwargs):
        epochs.append([])
        training.append(True)
        try:
            return train_epoch(self, *args, **kwargs)
        finally:
            training.pop()

    def recorded_item(self, index):
        if training:
            epochs[-1].append(index)
        return get_item(self, index)

    Engine.train_epoch, PostDataset.__getitem__ = recorded_epoch, recorded_item

    def flush() -> None:
        with open(record, "a") as stream:
            stream.write(json.dumps(epochs) + "\n")
        epochs.clear()

    return flush


def _process(argvs: list[list[str]], env: dict, log: str, record: str | None = None) -> None:
    import torch
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)  # as DataLoader workers do: a forked OpenMP pool must not be reused
    os.environ.update(env)
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that trained alone
    flush = _record_training_posts(record) if record else None
    code = 0
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 2)
        sys.stderr = stream
        try:
            for argv in argvs:  # several runs in one process group (one group per test, not per run)
                code = code or main(argv)
                if flush:
                    flush()
        except BaseException:
            import traceback

            traceback.print_exc(file=stream)
            stream.flush()
            code = 1
    os._exit(code)


def run_forked(argvs: list, tmp_path: Path, *, timeout: float = 240, record: bool = False, ddp: bool = True,
               **env) -> tuple[list[int | None], list[str]]:
    """``mner-train`` in forked processes (one per entry; several form a DDP group like torchrun's workers):
    separate processes that can be killed, without paying the imports again. An entry is one argv or a
    list of argvs run one after the other. Returns exit codes (None: still running after ``timeout``
    seconds, then killed) and stderr; with ``record``, ``tmp_path/posts<rank>.jsonl`` lists the training
    posts each epoch of each run read. ``ddp=False``: independent processes (several ``tune`` workers)."""
    import multiprocessing
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = len(argvs)
    logs = [tmp_path / f"process{rank}.log" for rank in range(world)]
    context = multiprocessing.get_context("fork")
    processes = []
    for rank, argv in enumerate(argvs):
        runs = argv if argv and isinstance(argv[0], list) else [argv]
        rank_env = dict(env)
        if world > 1 and ddp:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        recording = str(tmp_path / f"posts{rank}.jsonl") if record else None
        processes.append(context.Process(target=_process, args=(runs, rank_env, str(logs[rank]), recording)))
        processes[-1].start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0))
    codes = [p.exitcode for p in processes]
    for process in processes:
        if process.exitcode is None:  # hung (a collective call no other process makes): not left behind
            process.kill()
            process.join()
    return codes, [log.read_text() for log in logs]


def recorded_posts(folder: Path, world: int) -> list[list[list[list[int]]]]:
    """What ``run_forked(..., record=True)`` noted: [rank][run][epoch] -> training post indices read."""
    return [[json.loads(line) for line in (Path(folder) / f"posts{rank}.jsonl").read_text().splitlines()]
            for rank in range(world)]
