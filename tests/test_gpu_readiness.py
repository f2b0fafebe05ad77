"""What a CPU can show of the GPU-readiness fixes (issue 19); the two-process runs are in test_resume.py,
and what only a GPU can prove is bench/gpu_check.sh (docs/gpu.md)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mner.trainer.inputs.batching import LengthGroupedBatchSampler, ShuffledBatchSampler, batch_sizes


# ---------------------------------------------------------------------------------------- 1. batches
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_batch_plan_every_post_once_and_the_same_steps_on_every_process(world):
    for posts in range(world, 70):
        for batch in (1, 2, 4, 16):
            sizes = batch_sizes(posts, batch, world)
            assert sum(sizes) == posts and len(sizes) % world == 0 and min(sizes) >= 1, (posts, batch, sizes)
            assert max(sizes) <= batch or batch == 1, (posts, batch, sizes)
    assert batch_sizes(1003, 16, 2)[-2:] == [6, 5]  # the case: 64 batches, 32 per process
    assert batch_sizes(37, 8, 1) == [8, 8, 8, 8, 5]  # one process: the remainder batch, as before


@pytest.mark.parametrize("sampler_cls", [LengthGroupedBatchSampler, ShuffledBatchSampler])
def test_ranks_of_one_epoch_read_every_post_exactly_once(sampler_cls):
    lengths = [3 + (i * 7) % 29 for i in range(1003)]
    for world in (2, 3):
        seen, steps = [], set()
        for rank in range(world):
            sampler = sampler_cls(lengths, 16, seed=4, rank=rank, world_size=world)
            sampler.set_epoch(3)
            batches = list(sampler)
            steps.add(len(batches))
            assert len(batches) == len(sampler)
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(1003)) and len(steps) == 1


def test_posts_fewer_than_processes_is_a_clear_error():
    from mner.trainer.core.config import ConfigError

    with pytest.raises(ConfigError, match="3 training posts cannot feed 4 processes"):
        batch_sizes(3, 8, 4)


# ------------------------------------------------------------------------------ 2. P-MNER statistics
def test_region_statistics_are_merged_across_processes_into_identical_buffers(monkeypatch):
    """Two 'processes' see different rows; with the all-gather each ends with the statistics of all
    rows (rank order, same arithmetic: bit-identical), equal to a direct computation; a process
    whose batch has no real region still takes part."""
    from mner.trainer.models import pmner

    rng = torch.Generator().manual_seed(0)
    steps = [(torch.randn(5, 4, generator=rng) * 3 + 1, torch.randn(2, 4, generator=rng)),
             (torch.randn(3, 4, generator=rng), torch.randn(0, 4, generator=rng))]  # rank 1 has no region
    modules = [pmner.RegionStandardizer(4), pmner.RegionStandardizer(4)]
    for mine, theirs in steps:
        parts = {0: mine, 1: theirs}

        def fake_gather(values, _parts=parts):  # what dist.all_gather returns: every rank's moments
            return [_moments(_parts[0]), _moments(_parts[1])]

        monkeypatch.setattr(pmner, "_gather_from_every_process", fake_gather)
        for module, rows in zip(modules, (mine, theirs)):
            module.train()
            regions = torch.zeros(1, max(len(rows), 1), 4)
            regions[0, : len(rows)] = rows
            mask = torch.arange(regions.size(1))[None] < len(rows)
            module(regions, mask)
    every_row = torch.cat([rows for step in steps for rows in step]).double()
    for name in ("count", "mean", "var"):
        assert torch.equal(getattr(modules[0], name), getattr(modules[1], name)), name
    torch.testing.assert_close(modules[0].mean, every_row.mean(0))
    torch.testing.assert_close(modules[0].var, every_row.var(0, unbiased=False))
    assert float(modules[0].count) == len(every_row)


def _moments(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    if not len(rows):
        return torch.zeros(1 + 2 * rows.size(1), dtype=torch.float64)
    return torch.cat([torch.tensor([float(len(rows))], dtype=torch.float64), rows.mean(0),
                      rows.var(0, unbiased=False)])


def test_untrained_region_standardizer_passes_vectors_on():
    from mner.trainer.models.pmner import RegionStandardizer

    module = RegionStandardizer(3).eval()
    regions, mask = torch.randn(2, 2, 3), torch.tensor([[True, False], [True, True]])
    assert torch.equal(module(regions, mask), regions * mask[..., None])


# --------------------------------------------------------------------------------- 3 and 8. the CRF
@contextlib.contextmanager
def counting_host_reads():
    """Counts Tensor -> Python reads (.item, .tolist, bool, int, float): each one is a host sync on a GPU."""
    counts = {"reads": 0}
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(original):
        def counted(self, *args, **kwargs):
            counts["reads"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_crf_equals_pytorch_crf_without_host_syncs():
    from mner.trainer.models.layers import BIOConstrainedCRF, crf_loss_and_decode

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    crf = BIOConstrainedCRF(labels)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        emissions = torch.randn(6, 9, 5, generator=generator) * 3
        lengths = torch.randint(1, 10, (6,), generator=generator)
        mask = torch.arange(9)[None] < lengths[:, None]
        tags = torch.randint(0, 5, (6, 9), generator=generator)
        torch.testing.assert_close(crf.log_likelihood(emissions, tags, mask), crf(emissions, tags, mask, "none"))
        assert crf.viterbi(emissions, mask) == crf.decode(emissions, mask)
    # the training loss reads nothing back to the host, even with a post that has no kept word
    word_mask = mask.clone()
    word_mask[2] = False
    emissions = emissions.bfloat16().requires_grad_()  # autocast's output: the CRF computes in fp32
    with counting_host_reads() as counts:
        loss, _ = crf_loss_and_decode(crf, emissions, word_mask, tags)
        loss.backward()
    assert counts["reads"] == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    _, paths = crf_loss_and_decode(crf, emissions.detach(), word_mask, decode=True)
    assert paths[2] == [] and [len(p) for p in paths] == word_mask.sum(1).tolist()


def test_promptmner_layers_read_nothing_back_when_given_the_text_width():
    from helpers.promptmner import tiny_layer

    layer = tiny_layer(use_mas=True)
    x, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    is_visual = torch.tensor([[False] * 4 + [True] * 2] * 2)
    with torch.no_grad():
        reference = layer(x, mask, is_visual)  # N_t read from is_visual (the defensive path)
        with counting_host_reads() as counts:
            given = layer(x, mask, is_visual, 4)
    assert counts["reads"] == 0
    torch.testing.assert_close(given, reference)


def test_host_copies_of_the_text_ride_along_without_being_moved():
    from accelerate.utils import send_to_device

    from mner.trainer.inputs.batching import Collator

    collator = Collator(pad_token_id=0)
    batch = collator([{"input_ids": [2, 7, 3], "word_index": [1], "word_mask": [True], "labels": [0],
                       "image_row": None}])
    moved = send_to_device(batch, torch.device("cpu"))
    assert moved["host"] is batch["host"] and torch.equal(moved["host"]["input_ids"], batch["input_ids"])


# ------------------------------------------------------------------------------------- 4. resume
@pytest.mark.filterwarnings("ignore:for (weight|bias). copying from a non-meta parameter")
def test_resumed_optimizer_state_sits_with_its_parameters_and_step_stays_on_the_cpu(tmp_path):
    """Parameters on PyTorch's ``meta`` device stand in for a GPU the checkpoint was not read onto:
    the moments follow the parameters, AdamW's ``step`` counters stay on the CPU (as torch keeps them
    for a non-capturable optimiser), and the weights are copied in, never read onto another device."""
    from mner.trainer.core.engine import Engine

    engine = Engine(device="cpu", precision="fp32", grad_accum=1)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    Engine.write_snapshot(engine.snapshot(model, optimizer, scheduler), tmp_path)

    elsewhere = torch.nn.Linear(3, 2, device="meta")
    optimizer = torch.optim.AdamW(elsewhere.parameters(), lr=0.1)
    engine.load_checkpoint(tmp_path, elsewhere, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1))
    for state in optimizer.state.values():
        assert state["step"].device.type == "cpu" and float(state["step"]) == 1
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
    engine.end()


# ------------------------------------------------------------------------------------ 5. devices
def test_use_device_makes_the_run_gpu_current(monkeypatch):
    from mner.pipeline.devices import use_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(str(device)))
    use_device("cpu")
    use_device("cuda:1")
    assert calls == ["cuda:1"]


def test_fork_rng_saves_the_generator_of_the_run_gpu():
    from mner.trainer.core.preflight import rng_devices

    assert rng_devices(torch.device("cpu")) == []
    assert rng_devices(torch.device("cuda", 3)) == [3]


def test_stage_clock_times_its_own_gpu():
    from mner.features.run.stages import StageClock

    assert StageClock(torch.device("cuda", 2)).device == torch.device("cuda", 2)


# ---------------------------------------------------------------------------------------- 6. bf16
@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_never_picks_emulated_bf16(monkeypatch, native, expected):
    from mner.trainer.core.engine import resolve_precision

    def is_bf16_supported(including_emulation: bool = True) -> bool:  # a V100 / T4 says True by default
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", on_cuda=True) == expected
    assert resolve_precision("bf16", on_cuda=True) == "bf16"  # asked for explicitly: allowed, even emulated


# ---------------------------------------------------------------------------------------- 9. seeds
def test_every_process_draws_its_own_dropout_and_one_process_is_unchanged():
    from mner.trainer.core.training import rank_seed

    assert rank_seed(13, 0) == 13
    assert len({rank_seed(13, rank) for rank in range(8)}) == 8


# ------------------------------------------------------------------------------- 8. the loss, read per window
def test_losses_read_once_per_window_still_name_the_step_and_batch_that_diverged():
    """On a GPU the engine reads the losses of LOSS_READ_EVERY steps at once (one host copy instead of
    one ``.item()`` per step); a non-finite loss still names its own step and posts."""
    from mner.trainer.core.engine import Engine, NonFiniteLoss

    engine = Engine(device="cpu", precision="fp32", grad_accum=1)
    model = torch.nn.Linear(2, 2)
    window = [(5 + i, torch.tensor(value), {"post_index": torch.tensor([2 * i, 2 * i + 1])})
              for i, value in enumerate([1.5, 2.5, 0.5])]
    with counting_host_reads() as counts:
        assert engine._read_losses(window, model) == pytest.approx(4.5)
    assert counts["reads"] == 1
    window[1] = (6, torch.tensor(float("nan")), window[1][2])
    with pytest.raises(NonFiniteLoss) as caught:
        engine._read_losses(window, model)
    assert caught.value.step == 6 and caught.value.post_indices == [2, 3]
    engine.end()
