"""bfloat16 master weights (``master_weights='bf16'``): stochastic rounding against its float64 definition, the
optimizer against torch's AdamW / Adam, updates far below a bfloat16 step surviving in expectation, every method
training bfloat16 parameters, bitwise resume, the step fused into the backward pass. (Their bad values are in
tests/test_training_config.py's table with the other training fields.)"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _method_helpers import assert_same, snapshot
from _training_helpers import METHODS, Stop, fit, interrupt_after, pipe_fixture, real_save

from editbench import training
from editbench.storage import read_safetensors
from editbench.training import loop
from editbench.training.bf16 import StochasticAdamW, stochastic_round_bf16
from editbench.training.session import TrainConfig

pipe = pipe_fixture()


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above each float32 ``x`` (float64), by truncating the low 16 bits."""
    bits = x.view(torch.int32).to(torch.int64)
    toward = (bits & ~0xFFFF).to(torch.int32).view(torch.float32).double()                   # toward zero
    away = ((bits & ~0xFFFF) + 0x10000).to(torch.int32).view(torch.float32).double()          # away from zero
    return torch.minimum(toward, away), torch.maximum(toward, away)


def test_stochastic_rounding_picks_a_neighbour_with_the_unbiased_probability():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([1.0 + 2 ** -9, -3.3, 0.1234567, -1e-20, 7.77e5, 2.0 ** -130], dtype=torch.float32)
    lo, hi = _neighbours(x)
    n = 40_000
    draws = torch.stack([stochastic_round_bf16(x, gen) for _ in range(n)]).double()         # (n, 6)
    assert bool(((draws == lo) | (draws == hi)).all())
    p_hi = (x.double() - lo) / (hi - lo)                                  # the probability that makes E[r(x)] = x
    freq = (draws == hi).double().mean(0)
    sd = (p_hi * (1 - p_hi) / n).sqrt()
    assert bool(((freq - p_hi).abs() <= 5 * sd + 1e-12).all()), (freq, p_hi)
    assert torch.allclose(draws.mean(0), x.double(), rtol=0, atol=float(5 * ((hi - lo) * sd).max()))


def test_stochastic_rounding_keeps_exact_values_signs_infinities_and_nans():
    gen = torch.Generator().manual_seed(1)
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf")]).to(torch.bfloat16).float()
    for _ in range(50):
        out = stochastic_round_bf16(exact, gen)
        assert torch.equal(out.float(), exact) and out.dtype == torch.bfloat16
        assert torch.equal(torch.signbit(out), torch.signbit(exact))
    # NaNs whose payload is in the low 16 bits (a carry would make them inf or 0), and a finite value a quarter
    # step above bfloat16's largest (a carry would make it inf)
    odd = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7F7F4000], dtype=torch.int32).view(torch.float32)
    for _ in range(200):
        out = stochastic_round_bf16(odd, gen)
        assert bool(out[:3].isnan().all()) and float(out[3]) == float(torch.finfo(torch.bfloat16).max)
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_bf16(exact.double())


@pytest.mark.parametrize("decoupled, reference", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_on_float32_parameters_the_update_is_torchs(decoupled, reference):
    torch.manual_seed(0)
    start = [torch.randn(5, 7), torch.randn(3)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    kw = {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    opt = StochasticAdamW([{"params": ours[:1]}, {"params": ours[1:], "lr": 1e-2}], decoupled=decoupled, **kw)
    opt_ref = reference([{"params": ref[:1]}, {"params": ref[1:], "lr": 1e-2}], **kw)
    for step in range(6):
        grads = [torch.randn_like(t) for t in start]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)
        for p, q in zip(ours, ref):
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][k], opt_ref.state[q][k], rtol=1e-6, atol=1e-9)


def test_updates_below_half_a_bfloat16_step_survive_in_expectation():
    """A constant gradient makes Adam move every weight by lr per step. At lr 1e-4 from 1.0 (a bfloat16 step there
    is 2**-8 below, 2**-7 above) round-to-nearest never moves a weight (torch's AdamW on bfloat16 parameters); the
    stochastically rounded weights follow the float64 trajectory in the mean."""
    n, lr, steps = 50_000, 1e-4, 20
    ours = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    nearest = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = StochasticAdamW([ours], lr=lr, seed=4)
    opt_nearest = torch.optim.AdamW([nearest], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        ours.grad, nearest.grad = torch.ones_like(ours), torch.ones_like(nearest)
        opt.step()
        opt_nearest.step()
    assert ours.dtype == opt.state[ours]["exp_avg"].dtype == opt.state[ours]["exp_avg_sq"].dtype == torch.bfloat16
    assert bool((nearest == 1).all())                                      # every update rounded away
    expected = 1.0 - steps * lr                                             # m / sqrt(v) = 1 after bias correction
    mean = float(ours.double().mean())
    # each step adds independent zero-mean rounding noise of at most one step (2**-8) per weight
    assert abs(mean - expected) < 5 * math.sqrt(steps) * 2 ** -8 / math.sqrt(n), (mean, expected)
    assert abs(mean - 1.0) > 0.8 * steps * lr


def test_the_moments_are_rounded_stochastically_too():
    """With beta2 = 0.999 each update of exp_avg_sq is below half a bfloat16 step: round-to-nearest would freeze it
    at its first value; stochastic rounding decays it as in float64."""
    n = 50_000
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = StochasticAdamW([p], lr=0.0, betas=(0.9, 0.999), seed=2)
    p.grad = torch.ones_like(p)
    opt.step()
    for _ in range(300):
        p.grad = torch.zeros_like(p)
        opt.step()
    want = 1e-3 * 0.999 ** 300                                  # (1 - beta2) g^2, then 300 decays
    got = float(opt.state[p]["exp_avg_sq"].double().mean())
    assert abs(got / want - 1) < 0.01, (got, want)              # nearest: stuck at 1e-3 (ratio 1.35)


def test_the_rounding_is_seeded_by_seed_step_and_parameter():
    def run(seed, steps=3):
        ps = [torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16)) for _ in range(2)]
        opt = StochasticAdamW(ps, lr=1e-3, seed=seed)
        torch.manual_seed(123)                                   # the global generator plays no part
        out = []
        for _ in range(steps):
            for p in ps:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
            out.append(torch.stack([p.detach().clone() for p in ps]))
        return torch.stack(out)                                  # (steps, params, 64)

    torch.manual_seed(0)
    a = run(7)
    torch.manual_seed(1)
    assert torch.equal(run(7), a) and not torch.equal(run(8), a)
    assert not torch.equal(a[0, 0], a[0, 1])                     # same values and gradients, another parameter
    opt = StochasticAdamW([torch.nn.Parameter(torch.ones(1))], seed=7)
    draws = {(t, k): torch.randint(0, 1 << 16, (32,), generator=opt._generator(torch.device("cpu"), t, k))
             for t in (1, 2) for k in (0, 1)}
    assert torch.equal(draws[1, 0], torch.randint(0, 1 << 16, (32,),
                                                  generator=opt._generator(torch.device("cpu"), 1, 0)))
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4   # every (step, parameter) its own stream


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_bfloat16_master_weights(name, monkeypatch):
    """On a bfloat16 pipeline every method's trained parameters, their gradients and the optimizer moments are
    bfloat16; the artifact is written and the pipeline is left as it was."""
    from editbench.testing import tiny_pipeline

    seen = []

    class Probe(StochasticAdamW):
        def step(self, closure=None):
            out = super().step(closure)
            seen.append({(p.dtype, self.state[p]["exp_avg"].dtype) for g in self.param_groups for p in g["params"]
                         if p in self.state})
            return out

    monkeypatch.setattr("editbench.training.bf16.StochasticAdamW", Probe)
    half = tiny_pipeline().to(torch.bfloat16)
    before = snapshot(half)
    art = fit(half, name, mixed_precision="bf16", master_weights="bf16")
    assert len(seen) == 2 and all(s == {(torch.bfloat16, torch.bfloat16)} for s in seen), seen
    assert math.isfinite(art.metadata["training"]["loss_last"])
    # the artifact's dtypes are those of float32 master weights: the base model's for DreamBooth, else float32
    assert {v.dtype for v in art.tensors.values() if v.is_floating_point()} == \
        {torch.bfloat16 if name == "dreambooth" else torch.float32}
    assert art.metadata["config"]["master_weights"] == "bf16"
    assert_same(before, snapshot(half))
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}


def test_bf16_master_weights_on_a_float32_pipeline_resume_bitwise(pipe, tmp_path, monkeypatch):
    kw = {"mixed_precision": "bf16", "master_weights": "bf16", "checkpoint_every": 1}
    full = fit(pipe, "dreambooth", steps=4, **kw)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Stop):
        fit(pipe, "dreambooth", steps=4, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    tensors, header = read_safetensors(tmp_path / training.CHECKPOINT_FILE, "checkpoint")
    assert json.loads(header["editbench_checkpoint"])["step"] == 2
    moments = {v.dtype for k, v in tensors.items() if k.startswith("optim/") and k.endswith("exp_avg")}
    assert moments == {torch.bfloat16}
    resumed = fit(pipe, "dreambooth", steps=4, checkpoint_dir=tmp_path, **kw)
    assert resumed.metadata["training"]["resumed_from"] == 2
    base = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    changed = 0
    for k, v in full.tensors.items():
        assert torch.equal(resumed.tensors[k], v), k
        if k in base:   # moved by training, not only by the cast to bfloat16
            changed += not torch.equal(v, base[k].to(torch.bfloat16).float())
    assert changed > 0
    assert {v.dtype for v in full.tensors.values()} == {torch.float32}   # written in the base model's dtype


def test_master_weights_flag_and_run_signature():
    from editbench.cli import build_parser
    from editbench.commands import train_overrides

    args = build_parser().parse_args(["train", "--method", "dreambooth", "--concept", "zebra", "--out", "x",
                                      "--mixed-precision", "bf16", "--master-weights", "bf16"])
    assert train_overrides(args) == {"mixed_precision": "bf16", "master_weights": "bf16"}
    assert "master_weights" not in TrainConfig().run_signature()          # older checkpoints still resume
    assert TrainConfig(mixed_precision="bf16", master_weights="bf16").run_signature()["master_weights"] == "bf16"
    assert TrainConfig(master_weights="bf16").trainable_dtype == torch.bfloat16


def test_custom_diffusion_delta_holds_the_update_not_the_rounding_of_the_base(pipe):
    """On a float32 pipeline the bfloat16 K/V weights start at the rounded base weights: with a learning rate too
    small to move a bfloat16 weight, every delta is exactly 0 (as with float32 master weights)."""
    art = fit(pipe, "custom_diffusion", mixed_precision="bf16", master_weights="bf16", lr=1e-30)
    deltas = [v for k, v in art.tensors.items() if k.endswith(".delta")]
    assert deltas and all(v.dtype == torch.float32 and not bool(v.any()) for v in deltas)


def test_fused_backward_updates_inside_backward_frees_the_gradients_and_equals_the_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(torch.bfloat16)
    twin = copy.deepcopy(net)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    fused = StochasticAdamW(net.parameters(), lr=1e-2, weight_decay=0.1, seed=3)
    plain = StochasticAdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, seed=3)
    handles = fused.hooks()
    for _ in range(3):
        net(x).square().sum().backward()
        assert all(p.grad is None for p in net.parameters())          # freed as soon as used
        twin(x).square().sum().backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
        for p, q in zip(net.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    for h in handles:
        h.remove()
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())          # hooks removed: plain gradients again


@pytest.mark.parametrize("master", ["bf16", "float32"])
def test_fused_backward_trains_like_the_plain_step(pipe, master):
    kw = {"mixed_precision": "bf16", "master_weights": master, "max_grad_norm": None}  # clipping: not fused
    plain = fit(pipe, "dreambooth", steps=3, **kw)
    fused = fit(pipe, "dreambooth", steps=3, fused_backward=True, **kw)
    assert fused.metadata["config"]["fused_backward"] is True
    for k, v in plain.tensors.items():
        if master == "bf16":   # the same optimizer, the same rounding noise: bitwise
            assert torch.equal(fused.tensors[k], v), k
        else:                  # torch's AdamW against the same update in editbench's loop
            torch.testing.assert_close(fused.tensors[k], v, rtol=1e-5, atol=1e-7)
