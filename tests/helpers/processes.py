"""``mner-train`` in forked processes: separate processes that can be killed (or form a DDP group), without
paying the imports again."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _process(argv: list[str], env: dict, log: str) -> None:
    import torch
    from accelerate.state import AcceleratorState

    from mner.trainer.cli import main

    torch.set_num_threads(1)  # as DataLoader workers do: a forked OpenMP pool must not be reused
    os.environ.update(env)
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that trained alone
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 2)
        sys.stderr = stream
        code = main(argv)
    os._exit(code)


def run_forked(argvs: list[list[str]], tmp_path: Path, *, ddp: bool = True, **env) -> tuple[list[int], list[str]]:
    """One forked process per argv, started together; with ``ddp`` several form one DDP group like
    torchrun's workers, without it they are independent (several ``tune`` workers). Returns exit codes
    and stderr."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    world = len(argvs)
    logs = [tmp_path / f"process{rank}.log" for rank in range(world)]
    context = multiprocessing.get_context("fork")
    processes = []
    for rank, argv in enumerate(argvs):
        rank_env = dict(env)
        if world > 1 and ddp:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(context.Process(target=_process, args=(argv, rank_env, str(logs[rank]))))
        processes[-1].start()
    for process in processes:
        process.join(timeout=240)
    return [p.exitcode for p in processes], [log.read_text() for log in logs]
