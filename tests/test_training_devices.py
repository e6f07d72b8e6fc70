"""The training loop on several devices: when it goes through ``accelerate``, and what that path does.

This machine has no GPU, so the multi-device path is exercised with a monkeypatched device count and an
``Accelerator`` stub (or the real ``accelerate.Accelerator``, single process on the CPU). A one-process
accelerate run must reproduce the plain loop bitwise: same generator, same gradient accumulation, same steps.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _eval_stubs import StubEditor
from _method_helpers import star_images

from editbench import training
from editbench.concepts import ConceptData
from editbench.errors import EditbenchError, TrainingError
from editbench.testing import tiny_pipeline
from editbench.training import loop, parallel

KW = {"steps": 3, "batch_size": 2, "grad_accum": 2, "checkpoint_every": 1}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return ConceptData("sks", "dog", star_images(tmp_path_factory.mktemp("concept"), n=3, size=24))


@pytest.fixture
def clean_env(monkeypatch):
    for var in (training.ACCELERATE_ENV, "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


class StubOptimizer:
    def __init__(self, opt, calls):
        self.optimizer, self.calls = opt, calls

    def step(self):
        self.calls["step"] += 1
        self.optimizer.step()

    def zero_grad(self, set_to_none=None):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class StubAccelerator:
    """``n`` processes that all computed the same gradients: a mean-reduce returns the tensor, a sum n times it."""

    distributed_type = "MULTI_GPU"

    def __init__(self, n: int = 2, rank: int = 0, device: str = "cpu"):
        self.num_processes, self.process_index, self.is_main_process = n, rank, rank == 0
        self.device = torch.device(device)
        self.calls: Counter = Counter()

    def prepare(self, opt):
        self.calls["prepare"] += 1
        return StubOptimizer(opt, self.calls)

    def backward(self, loss):
        self.calls["backward"] += 1
        loss.backward()

    def reduce(self, tensor, reduction="sum"):
        self.calls[f"reduce_{reduction}"] += 1
        return tensor.clone() * (self.num_processes if reduction == "sum" else 1)

    def wait_for_everyone(self):
        self.calls["wait"] += 1

    def free_memory(self):
        self.calls["free"] += 1


def _fit(pipe, concept, tmp_path=None, **kw):
    return StubEditor(**{**KW, **kw}).fit(pipe, concept, progress=False, seed=3, checkpoint_dir=tmp_path)


def _through(monkeypatch, acc):
    """Make the loop take the accelerate path with ``acc``: two devices visible, a two-process launch."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(loop, "make_accelerator", lambda: acc)
    return acc


def test_the_plain_loop_is_chosen_on_cpu_or_one_device(clean_env):
    mp = clean_env
    mp.setattr(torch.cuda, "device_count", lambda: 0)
    assert not training.use_accelerate()                                      # a CPU machine
    mp.setenv("WORLD_SIZE", "4")
    mp.setenv(training.ACCELERATE_ENV, "1")
    assert not training.use_accelerate()                                      # forced, but no second device
    mp.setattr(torch.cuda, "device_count", lambda: 1)
    assert not training.use_accelerate()                                      # one GPU: plain loop
    mp.setattr(torch.cuda, "device_count", lambda: 2)
    assert training.use_accelerate()
    mp.setenv(training.ACCELERATE_ENV, "0")
    assert not training.use_accelerate()                                      # opted out
    mp.setenv(training.ACCELERATE_ENV, "auto")
    assert training.use_accelerate()                                          # launched: WORLD_SIZE=4
    mp.delenv("WORLD_SIZE")
    assert not training.use_accelerate()                                      # two GPUs, one plain process
    mp.setenv(training.ACCELERATE_ENV, "on")
    assert training.use_accelerate()
    mp.setenv(training.ACCELERATE_ENV, "maybe")
    with pytest.raises(EditbenchError, match=training.ACCELERATE_ENV):
        training.use_accelerate()


def test_the_plain_loop_never_builds_an_accelerator(pipe, concept, clean_env):
    def boom():
        raise AssertionError("accelerate used on the plain path")

    clean_env.setattr(loop, "make_accelerator", boom)
    art = _fit(pipe, concept)
    assert "processes" not in art.metadata["training"]


def test_accelerate_path_uses_backward_keeps_grad_accum_and_matches_the_plain_loop(pipe, concept, clean_env,
                                                                                   tmp_path):
    plain = _fit(pipe, concept)
    acc = _through(clean_env, StubAccelerator(n=2))
    par = _fit(pipe, concept, tmp_path / "ckpt")
    c = acc.calls
    assert c["prepare"] == 1 and c["backward"] == KW["steps"] * KW["grad_accum"]    # accelerator.backward per micro
    assert c["step"] == KW["steps"]                                                 # one optimizer step per step
    assert c["reduce_mean"] == KW["steps"] * 2      # per step: the loss + the one trained tensor's gradient
    assert c["reduce_sum"] == KW["steps"] and c["wait"] == KW["steps"] and c["free"] == 1
    assert par.metadata["training"]["processes"] == 2
    # process 0 keeps the seed and the accumulation is the plain loop's: identical result, bitwise
    assert torch.equal(par.tensors["delta"], plain.tensors["delta"])
    assert par.metadata["training"]["loss_last"] == plain.metadata["training"]["loss_last"]
    assert not torch.equal(par.tensors["delta"], torch.zeros_like(par.tensors["delta"]))   # it trained
    assert (tmp_path / "ckpt" / training.CHECKPOINT_FILE).is_file()                 # the main process writes


def test_other_processes_draw_their_own_data_and_write_no_checkpoint(pipe, concept, clean_env, tmp_path):
    plain = _fit(pipe, concept)
    acc = _through(clean_env, StubAccelerator(n=2, rank=1))
    other = _fit(pipe, concept, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / training.CHECKPOINT_FILE).exists()
    assert acc.calls["wait"] == KW["steps"]
    assert not torch.equal(other.tensors["delta"], plain.tensors["delta"])          # other micro-batches / noise


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: start from none and leave none behind."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)


def test_real_accelerator_single_process_on_cpu_matches_the_plain_loop_and_resumes(pipe, concept, clean_env,
                                                                                   tmp_path, fresh_accelerate_state):
    plain = _fit(pipe, concept, steps=5)
    clean_env.setattr(loop, "use_accelerate", lambda: True)   # the decision is tested above
    part = _fit(pipe, concept, tmp_path, steps=3)
    resumed = _fit(pipe, concept, tmp_path, steps=5)
    assert resumed.metadata["training"]["resumed_from"] == 3 and resumed.metadata["training"]["processes"] == 1
    assert torch.equal(resumed.tensors["delta"], plain.tensors["delta"])
    assert not torch.equal(part.tensors["delta"], plain.tensors["delta"])


def test_non_finite_loss_stops_every_process_at_the_same_step(pipe, concept, clean_env, monkeypatch):
    _through(clean_env, StubAccelerator(n=2))
    real = loop.masked_mse
    monkeypatch.setattr(loop, "masked_mse", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError, match="at step 1 .*2 processes"):
        _fit(pipe, concept)


def test_wrong_device_or_distributed_type_is_refused(pipe, concept, clean_env):
    _through(clean_env, StubAccelerator(device="meta"))
    with pytest.raises(TrainingError, match="own device"):
        _fit(pipe, concept)
    acc = StubAccelerator()
    acc.distributed_type = "DEEPSPEED"
    _through(clean_env, acc)
    with pytest.raises(TrainingError, match="DEEPSPEED"):
        _fit(pipe, concept)


def test_gradients_are_averaged_in_one_all_reduce_per_dtype_bucket():
    class Doubling(StubAccelerator):
        def reduce(self, tensor, reduction="sum"):  # the other process holds 3x this one's gradients: mean = 2x
            self.calls[f"reduce_{reduction}"] += 1
            return tensor.clone() * (self.num_processes if reduction == "sum" else 2)

    acc = Doubling()
    dp = parallel.DataParallel(acc, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=dt))
              for shape, dt in (((3, 4), torch.float32), ((5,), torch.float64), ((2, 2), torch.float32),
                                ((7,), torch.float32))]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    dp.reduce_grads(params)
    for p, b in zip(params[:3], before[:3]):
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, 2 * b, rtol=0, atol=0)
    assert params[3].grad is None                                        # no process had a gradient: stays None
    assert acc.calls["reduce_mean"] == 2                                 # one float32 bucket, one float64 bucket
