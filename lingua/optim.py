"""AdamW with per-parameter groups and Meta Lingua's learning-rate schedules.

Each parameter belongs to one component, `base`, `memory` or `lora`, declared by the module
that owns it: a module class sets `optim_component = "memory"` (or "lora") and every parameter
under it belongs to that component (the innermost declaration wins); the rest is `base`. The
component's lr is `optim.memory_lr` / `lora_lr` / `base_model_lr` (None: `optim.lr`), and a
component whose lr is 0 is frozen: requires_grad off, so no gradient, no optimizer state, no
weight decay, and bit-identical weights after training.

A module can also give some of its parameters their own lr / weight decay by defining
`optim_overrides() -> {local_param_name: {"lr": .., "weight_decay": .., "name": ..}}` (value
tables' value_fixed_lr: it applies inside the memory component, and a frozen memory freezes
them too). Components and overrides are found by walking named_modules, so they survive FSDP
wrapping and checkpoint loading (they are code, not state). Every schedule returns a factor
applied to each group's own lr; each group carries a `label` (its component, or the
override's name) for metrics.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

COMPONENTS = ("base", "memory", "lora")

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lingua.args import choice


@dataclass
class OptimArgs:
    lr: float = 3e-4
    weight_decay: float = 0.1
    epsilon: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    scheduler: str = choice("cosine", ("constant", "linear", "inv_sqrt", "cosine", "wsd", "step"))
    warmup: int = 2000
    lr_min_ratio: float = 0.1
    cycle_length: float = 1.0
    cosine_theta: float = 1.0
    annealing_step: int = 1000
    decay_fraction: float = 0.1
    exp_factor: float = 0.5
    # Not in Meta Lingua: per-component learning rates (None: lr; 0: frozen). See the module doc.
    memory_lr: Optional[float] = None
    lora_lr: Optional[float] = None
    base_model_lr: Optional[float] = None
    # Not in Meta Lingua: scheduler=step multiplies the lr by step_gamma every step_size steps
    # after warmup (torch's StepLR, as HMT's --lr_decay).
    step_size: int = 100
    step_gamma: float = 0.8

    def component_lr(self, component: str) -> float:
        lr = {"base": self.base_model_lr, "memory": self.memory_lr, "lora": self.lora_lr}[component]
        return float(self.lr if lr is None else lr)


def _warmup(step: int, warmup: int) -> Optional[float]:
    return (step + 1) / warmup if step < warmup else None


def lr_constant(step: int, warmup: int) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def lr_linear(step: int, warmup: int, n_steps: int, min_ratio: float) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup) / max(1, n_steps - warmup))
    return 1.0 - (1.0 - min_ratio) * progress


def lr_inv_sqrt(step: int, warmup: int, exp_factor: float, min_ratio: float) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    # max(1, warmup): with warmup=0 the factor would be 0 and the run would sit at min_ratio.
    return max((max(1, warmup) / (step + 1)) ** exp_factor, min_ratio)


def lr_cosine(step: int, warmup: int, n_steps: int, cycle_length: float, theta: float, min_ratio: float) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    s = (step - warmup) / max(1, n_steps - warmup) / cycle_length
    if s >= 1.0 and cycle_length >= 1.0:
        return min_ratio
    cos = math.cos(math.pi * (s % 1.0) ** theta)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + cos)


def lr_wsd(step: int, warmup: int, n_steps: int, decay_fraction: float, cycle_length: float, min_ratio: float) -> float:
    """Warmup-stable-decay: flat after warmup, then a (1 - sqrt) decay over the last fraction."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    cycle = max(1, int(n_steps * cycle_length))
    decay_len = max(1, int(decay_fraction * cycle))
    pos = step % cycle if cycle_length < 1.0 else min(step, cycle)
    if pos < cycle - decay_len:
        return 1.0
    progress = (pos - (cycle - decay_len)) / decay_len
    return min_ratio + (1.0 - min_ratio) * (1.0 - math.sqrt(min(1.0, progress)))


def lr_step(step: int, warmup: int, step_size: int, gamma: float) -> float:
    w = _warmup(step, warmup)
    return w if w is not None else gamma ** ((step - warmup) // step_size)


def build_lr_fn(args: OptimArgs, n_steps: int) -> Callable[[int], float]:
    if args.scheduler == "step" and args.step_size < 1:
        raise ValueError(f"optim.step_size must be >= 1, got {args.step_size}")
    return {
        "step": partial(lr_step, warmup=args.warmup, step_size=args.step_size, gamma=args.step_gamma),
        "constant": partial(lr_constant, warmup=args.warmup),
        "linear": partial(lr_linear, warmup=args.warmup, n_steps=n_steps, min_ratio=args.lr_min_ratio),
        "inv_sqrt": partial(lr_inv_sqrt, warmup=args.warmup, exp_factor=args.exp_factor, min_ratio=args.lr_min_ratio),
        "cosine": partial(
            lr_cosine,
            warmup=args.warmup,
            n_steps=n_steps,
            cycle_length=args.cycle_length,
            theta=args.cosine_theta,
            min_ratio=args.lr_min_ratio,
        ),
        "wsd": partial(
            lr_wsd,
            warmup=args.warmup,
            n_steps=n_steps,
            decay_fraction=args.decay_fraction,
            cycle_length=args.cycle_length,
            min_ratio=args.lr_min_ratio,
        ),
    }[args.scheduler]


def collect_overrides(model: nn.Module) -> dict[str, dict]:
    """Full parameter name -> {"lr"/"weight_decay"} from every module's optim_overrides()."""
    out = {}
    for mod_name, module in model.named_modules():
        fn = getattr(module, "optim_overrides", None)
        if fn is None:
            continue
        for local, override in fn().items():
            out[f"{mod_name}.{local}" if mod_name else local] = dict(override)
    return out


def param_components(model: nn.Module) -> dict[str, str]:
    """Full parameter name -> its component, from the `optim_component` of the innermost
    module above it that declares one; "base" for the rest."""
    owner: dict[str, str] = {}
    for mod_name, module in model.named_modules():  # parents come before their children
        component = getattr(module, "optim_component", None)
        if component is None:
            continue
        if component not in COMPONENTS:
            raise ValueError(f"{type(module).__name__}.optim_component={component!r}: not one of {COMPONENTS}")
        for name, _ in module.named_parameters(prefix=mod_name, remove_duplicate=False):
            owner[name] = component
    return {name: owner.get(name, "base") for name, _ in model.named_parameters()}


def freeze_components(model: nn.Module, args: OptimArgs) -> list[str]:
    """requires_grad off for the parameters of every component whose lr is 0; their names."""
    frozen = []
    components = param_components(model)
    for name, param in model.named_parameters():
        if args.component_lr(components[name]) == 0:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _mesh_key(param: torch.Tensor) -> tuple:
    """() for a plain tensor; the device mesh of a DTensor. The fused AdamW kernel takes one
    kind per call: plain tensors and DTensors, or DTensors of different meshes, do not mix."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return ()
    mesh = param.device_mesh
    return (tuple(mesh.mesh_dim_names or ()), tuple(mesh.mesh.flatten().tolist()))


def param_groups(model: nn.Module, args: OptimArgs) -> list[dict]:
    """One group per component label, distinct (lr, weight_decay) and device mesh; the base
    component at the default lr and decay first. Frozen parameters are in none."""
    overrides = collect_overrides(model)
    components = param_components(model)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component, o = components[name], overrides.get(name, {})
        label = o.get("name", component)
        lr = float(o.get("lr", args.component_lr(component)))
        decay = float(o.get("weight_decay", args.weight_decay))
        group = groups.setdefault((label, lr, decay, _mesh_key(param)),
                                  {"params": [], "names": [], "lr": lr, "weight_decay": decay, "label": label})
        group["params"].append(param)
        group["names"].append(name)
    default = ("base", float(args.component_lr("base")), float(args.weight_decay))
    return sorted(groups.values(), key=lambda g: (g["label"], g["lr"], g["weight_decay"]) != default)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of each group by label (metrics.jsonl's optim/lr_group/<label>)."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        label = group.get("label", f"group{i}")  # checkpoints from before labels restore groups without
        out.setdefault(label, group["lr"])
    return out


def build_optimizer(model: nn.Module, args: OptimArgs, n_steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the model's trainable parameters and its schedule. Freezes (requires_grad off)
    every component whose lr is 0 first, so the step computes no gradient for it."""
    freeze_components(model, args)
    groups = param_groups(model, args)
    if not groups:
        raise ValueError("every parameter is frozen (optim.lr / base_model_lr / memory_lr / lora_lr are 0): "
                         "nothing to train")
    for group in groups:
        del group["names"]  # only for tests and debugging; AdamW would carry it into its state
    # Fused: one kernel per device and dtype, and it takes `found_inf` (as from GradScaler), so
    # the training step skips a non-finite update on the device without reading a flag.
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.epsilon, weight_decay=args.weight_decay, fused=True
    )
    scheduler = LambdaLR(optimizer, build_lr_fn(args, n_steps))
    return optimizer, scheduler
