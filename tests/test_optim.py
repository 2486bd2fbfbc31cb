"""Tests for lingua/optim.py: the five schedules, per-module param groups, and the
optimizer / scheduler state surviving a JSON round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lingua.optim import OptimArgs, build_lr_fn, build_optimizer, collect_overrides, param_groups

SCHEDULERS = ("constant", "linear", "inv_sqrt", "cosine", "wsd")
N_STEPS = 200
WARMUP = 20
MIN_RATIO = 0.05


def lr_values(scheduler: str, n_steps: int = N_STEPS, **kw) -> list[float]:
    args = OptimArgs(scheduler=scheduler, warmup=WARMUP, lr_min_ratio=MIN_RATIO, **kw)
    fn = build_lr_fn(args, n_steps)
    return [fn(s) for s in range(n_steps + 1)]


def non_increasing(xs: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(xs, xs[1:]))


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_warmup_ramps_linearly_to_one(scheduler: str) -> None:
    lrs = lr_values(scheduler)
    warm = lrs[:WARMUP]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(s == pytest.approx(1.0 / WARMUP) for s in steps), steps
    assert warm[0] == pytest.approx(1.0 / WARMUP)
    assert warm[-1] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert all(0.0 < x <= 1.0 + 1e-12 for x in lrs)


def test_constant_is_flat_after_warmup() -> None:
    lrs = lr_values("constant")
    assert all(x == 1.0 for x in lrs[WARMUP - 1 :])


def test_linear_decays_to_min_ratio() -> None:
    lrs = lr_values("linear")
    assert non_increasing(lrs[WARMUP - 1 :])
    assert lrs[N_STEPS] == pytest.approx(MIN_RATIO)
    assert lrs[N_STEPS - 1] > MIN_RATIO
    mid = WARMUP + (N_STEPS - WARMUP) // 2
    assert lrs[mid] == pytest.approx((1 + MIN_RATIO) / 2)
    # Equal decrements: a straight line.
    diffs = [a - b for a, b in zip(lrs[WARMUP:N_STEPS], lrs[WARMUP + 1 : N_STEPS + 1])]
    assert max(diffs) == pytest.approx(min(diffs))
    # Past the end it stays at the floor instead of going negative.
    fn = build_lr_fn(OptimArgs(scheduler="linear", warmup=WARMUP, lr_min_ratio=MIN_RATIO), N_STEPS)
    assert fn(N_STEPS * 3) == pytest.approx(MIN_RATIO)


def test_cosine_reaches_min_ratio_at_n_steps() -> None:
    lrs = lr_values("cosine")
    assert non_increasing(lrs[WARMUP - 1 :])
    assert lrs[WARMUP] == pytest.approx(1.0)
    assert lrs[N_STEPS] == pytest.approx(MIN_RATIO)
    assert lrs[N_STEPS - 1] > MIN_RATIO
    mid = WARMUP + (N_STEPS - WARMUP) // 2
    assert lrs[mid] == pytest.approx((1 + MIN_RATIO) / 2)
    for step in (WARMUP + 1, WARMUP + 37, N_STEPS - 20, N_STEPS - 1):
        progress = (step - WARMUP) / (N_STEPS - WARMUP)
        assert lrs[step] == pytest.approx(MIN_RATIO + 0.5 * (1 - MIN_RATIO) * (1 + math.cos(math.pi * progress)))
    # Cosine: slow at both ends, fast in the middle.
    assert lrs[WARMUP] - lrs[WARMUP + 10] < lrs[mid - 5] - lrs[mid + 5]
    fn = build_lr_fn(OptimArgs(scheduler="cosine", warmup=WARMUP, lr_min_ratio=MIN_RATIO), N_STEPS)
    assert fn(N_STEPS + 50) == pytest.approx(MIN_RATIO)


def test_inv_sqrt_decays_with_floor() -> None:
    lrs = lr_values("inv_sqrt", n_steps=10_000, exp_factor=0.5)  # floor from step 8000
    after = lrs[WARMUP:]
    assert non_increasing(after)
    assert after[0] <= 1.0
    # (warmup / (step + 1)) ** 0.5 until the floor.
    assert lrs[4 * WARMUP - 1] == pytest.approx(0.5)
    assert min(lrs) == pytest.approx(MIN_RATIO)
    assert lrs[-1] == pytest.approx(MIN_RATIO)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_no_warmup_starts_at_full_lr(scheduler: str) -> None:
    fn = build_lr_fn(OptimArgs(scheduler=scheduler, warmup=0, lr_min_ratio=MIN_RATIO), N_STEPS)
    assert fn(0) == pytest.approx(1.0)
    lrs = [fn(s) for s in range(N_STEPS + 1)]
    assert non_increasing(lrs) and all(MIN_RATIO - 1e-12 <= x <= 1.0 for x in lrs)
    if scheduler == "inv_sqrt":
        assert lrs[3] == pytest.approx(0.5)


def test_wsd_flat_then_decays_to_min_ratio() -> None:
    decay_fraction = 0.2
    lrs = lr_values("wsd", decay_fraction=decay_fraction)
    decay_len = int(decay_fraction * N_STEPS)
    decay_start = N_STEPS - decay_len
    assert all(x == 1.0 for x in lrs[WARMUP - 1 : decay_start + 1])  # stable phase
    decay = lrs[decay_start:]
    assert non_increasing(decay)
    assert lrs[decay_start + 1] < 1.0
    assert lrs[N_STEPS] == pytest.approx(MIN_RATIO)
    assert lrs[N_STEPS - 1] > MIN_RATIO
    # 1 - sqrt decay: a quarter of the way down the ratio has lost half its range.
    quarter = decay_start + decay_len // 4
    assert lrs[quarter] == pytest.approx(MIN_RATIO + (1 - MIN_RATIO) * 0.5)


def test_unknown_scheduler_rejected_by_config() -> None:
    from lingua.args import ConfigError, from_dict

    with pytest.raises(ConfigError, match="scheduler"):
        from_dict(OptimArgs, {"scheduler": "exponential"})


# ---------------------------------------------------------------- param groups


class MemoryLike(nn.Module):
    """A module whose `values` table trains with its own lr and no weight decay."""

    def __init__(self) -> None:
        super().__init__()
        self.values = nn.Embedding(16, 4)
        self.proj = nn.Linear(4, 4)

    def optim_overrides(self) -> dict[str, dict]:
        return {"values.weight": {"lr": 1e-3, "weight_decay": 0.0}}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), MemoryLike(), nn.Linear(4, 4)])
        self.out = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.blocks[0](h)
        h = h + self.blocks[1].proj(h) + self.blocks[1].values(torch.arange(h.shape[0]) % 16)
        h = self.blocks[2](h)
        return self.out(h + self.frozen(h))


def test_overrides_found_by_full_name() -> None:
    assert collect_overrides(Net()) == {"blocks.1.values.weight": {"lr": 1e-3, "weight_decay": 0.0}}


def test_param_groups_override_gets_own_group() -> None:
    model = Net()
    args = OptimArgs(lr=3e-2, weight_decay=0.1)
    groups = param_groups(model, args)
    assert len(groups) == 2
    default, special = groups
    assert (default["lr"], default["weight_decay"]) == (3e-2, 0.1)
    assert (special["lr"], special["weight_decay"]) == (1e-3, 0.0)
    assert special["names"] == ["blocks.1.values.weight"]
    assert "blocks.1.proj.weight" in default["names"]
    # Every trainable parameter exactly once; frozen ones left out.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = default["names"] + special["names"]
    assert len(names) == len(set(names)) and set(names) == trainable
    assert not any(n.startswith("frozen.") for n in names)
    params = {id(p) for g in groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters() if p.requires_grad}


def test_lambda_factor_scales_each_groups_own_lr() -> None:
    torch.manual_seed(0)
    model = Net()
    args = OptimArgs(lr=3e-2, weight_decay=0.1, scheduler="linear", warmup=4, lr_min_ratio=0.1)
    n_steps = 12
    optimizer, scheduler = build_optimizer(model, args, n_steps)
    fn = build_lr_fn(args, n_steps)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-2 * fn(0), 1e-3 * fn(0)])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all("names" not in g for g in optimizer.param_groups)
    x = torch.randn(8, 4)
    for step in range(n_steps):
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([3e-2 * fn(step), 1e-3 * fn(step)]), step
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-2 * 0.1, 1e-3 * 0.1])


def test_weight_decay_applies_per_group() -> None:
    # With zero gradients AdamW only decays: the override group (wd=0) must not move.
    model = Net()
    args = OptimArgs(lr=0.5, weight_decay=0.5, scheduler="constant", warmup=0)
    optimizer, _ = build_optimizer(model, args, 10)
    values_before = model.blocks[1].values.weight.detach().clone()
    inp_before = model.inp.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    assert torch.equal(model.blocks[1].values.weight, values_before)
    assert torch.allclose(model.inp.weight, inp_before * (1 - 0.5 * 0.5))


# ---------------------------------------------------------------- state round trip


def _to_json(obj):
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.tolist(), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        return {"__keys__": [[_to_json(k), _to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
    if isinstance(obj, dict) and "__keys__" in obj:
        return {_from_json(k): _from_json(v) for k, v in obj["__keys__"]}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def _train(model, optimizer, scheduler, xs) -> list[list[float]]:
    lrs = []
    for x in xs:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return lrs


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_state_dicts_round_trip_through_json(scheduler_name: str) -> None:
    torch.manual_seed(0)
    args = OptimArgs(lr=1e-2, scheduler=scheduler_name, warmup=3, lr_min_ratio=0.1, decay_fraction=0.3)
    n_steps = 10
    xs = [torch.randn(8, 4) for _ in range(n_steps)]

    model = Net()
    optimizer, scheduler = build_optimizer(model, args, n_steps)
    _train(model, optimizer, scheduler, xs[:4])

    # The scheduler state is what train_state_*.json holds: plain json, no helper.
    sched_json = json.dumps(scheduler.state_dict())
    optim_json = json.dumps(_to_json(optimizer.state_dict()))
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    rest = _train(model, optimizer, scheduler, xs[4:])
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = Net()
    model2.load_state_dict(model_state)
    optimizer2, scheduler2 = build_optimizer(model2, args, n_steps)
    optimizer2.load_state_dict(_from_json(json.loads(optim_json)))
    scheduler2.load_state_dict(json.loads(sched_json))
    assert scheduler2.last_epoch == 4
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in _reference_groups(args, n_steps, 4)]
    assert [g["initial_lr"] for g in optimizer2.param_groups] == [1e-2, 1e-3]
    rest2 = _train(model2, optimizer2, scheduler2, xs[4:])
    assert rest2 == rest
    for k, v in model2.state_dict().items():
        assert torch.equal(v, final[k]), k


def _reference_groups(args: OptimArgs, n_steps: int, step: int) -> list[dict]:
    fn = build_lr_fn(args, n_steps)
    return [{"lr": args.lr * fn(step)}, {"lr": 1e-3 * fn(step)}]


def test_override_lr_survives_loading_into_default_optimizer() -> None:
    # Meta Lingua lost the memory value lr when initialising from a checkpoint: the
    # override group's lr must come back from the saved state and from the code alike.
    args = OptimArgs(lr=1e-2, scheduler="constant", warmup=0)
    model = Net()
    optimizer, scheduler = build_optimizer(model, args, 5)
    state = json.loads(json.dumps(_to_json(optimizer.state_dict())))
    optimizer2, _ = build_optimizer(Net(), args, 5)
    optimizer2.load_state_dict(_from_json(state))
    assert [g["lr"] for g in optimizer2.param_groups] == [1e-2, 1e-3]
    assert [g["weight_decay"] for g in optimizer2.param_groups] == [args.weight_decay, 0.0]
    assert math.isclose(scheduler.get_last_lr()[1], 1e-3)


# ---------------------------------------------------------------- components


class Adapter(nn.Module):
    optim_component = "lora"

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2, bias=False)
        self.b = nn.Linear(2, 4, bias=False)


class Memory(MemoryLike):
    optim_component = "memory"

    def optim_overrides(self) -> dict[str, dict]:
        return {"values.weight": {"lr": 1e-3, "weight_decay": 0.0, "name": "memory_values"}}


class ComponentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.memory = Memory()
        self.adapter = Adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.memory.proj(h) + self.memory.values(torch.arange(h.shape[0]) % 16)
        return h + self.adapter.b(self.adapter.a(h))


def test_each_parameter_belongs_to_the_component_its_module_declares() -> None:
    from lingua.optim import param_components

    components = param_components(ComponentNet())
    assert components == {"inp.weight": "base", "inp.bias": "base", "memory.values.weight": "memory",
                          "memory.proj.weight": "memory", "memory.proj.bias": "memory",
                          "adapter.a.weight": "lora", "adapter.b.weight": "lora"}


def test_component_learning_rates_and_a_frozen_component() -> None:
    """memory_lr for the memory (its value table keeps its own lr), lora_lr 0 freezes the
    adapter: no gradient, not in the optimizer, bit-identical after training; base at lr."""
    from lingua.optim import group_lrs

    torch.manual_seed(0)
    model = ComponentNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = OptimArgs(lr=1e-2, memory_lr=2e-3, lora_lr=0.0, warmup=0, scheduler="constant")
    optimizer, scheduler = build_optimizer(model, args, 10)
    assert group_lrs(optimizer) == {"base": 1e-2, "memory": 2e-3, "memory_values": 1e-3}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.adapter.parameters())
    assert not any(p.requires_grad for p in model.adapter.parameters())
    x = torch.randn(8, 4)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        assert all(p.grad is None for p in model.adapter.parameters())
        optimizer.step()
        scheduler.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (not name.startswith("adapter.")), name
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(ComponentNet(), OptimArgs(lr=0.0), 10)


def test_step_schedule_is_torch_steplr_after_warmup():
    from torch.optim.lr_scheduler import StepLR

    fn = build_lr_fn(OptimArgs(scheduler="step", warmup=0, step_size=3, step_gamma=0.8), 20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = StepLR(opt, step_size=3, gamma=0.8)
    for step in range(10):
        assert fn(step) == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        ref.step()
    warm = build_lr_fn(OptimArgs(scheduler="step", warmup=4, step_size=3, step_gamma=0.5), 20)
    assert [warm(s) for s in range(9)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
