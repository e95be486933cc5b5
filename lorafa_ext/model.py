"""Applying LoRA-FA to a whole model: ``apply_lorafa``, ``lorafa_parameters`` and helpers.

``target_modules`` follows PEFT's ``LoraConfig.target_modules``: a string is a regular expression
that must match a module's full name (``re.fullmatch``); a list matches a module whose full name is
in the list or ends with ``"." + entry``; ``"all-linear"`` selects every ``nn.Linear`` except the
output layer of a transformers model. ``rank_pattern`` / ``alpha_pattern`` follow PEFT too: the first
key (a regular expression) matching the end of a module's name, ``re.match(rf"(.*\\.)?({key})$", name)``,
gives that module's rank / alpha.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layers import LoRAFALinear, _check_alpha, _check_dropout, _check_init

__all__ = [
    "apply_lorafa",
    "lorafa_parameters",
    "lorafa_layers",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "match_target_modules",
    "pattern_value",
]

TargetModules = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


def pattern_value(pattern: Optional[Dict[str, object]], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key matching ``name``."""
    for key in (pattern or {}):
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _target_matches(target_modules: TargetModules, name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def _walk(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """named_modules() that does not descend into LoRA-FA layers (their base_layer is not a target)."""
    stack = [("", model)]
    seen = set()
    while stack:
        name, mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield name, mod
        if isinstance(mod, LoRAFALinear) or _is_switched_peft_layer(mod):
            continue
        children = list(mod.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def _is_switched_peft_layer(mod: nn.Module) -> bool:
    return getattr(mod, "_lorafa_switched", False)


def _output_layer_names(model: nn.Module) -> set:
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return set()
    try:
        out = get_out()
    except Exception:
        return set()
    if out is None:
        return set()
    return {name for name, mod in model.named_modules() if mod is out}


def match_target_modules(
    model: nn.Module, target_modules: TargetModules, exclude_modules: Optional[TargetModules] = None
) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` that ``target_modules`` selects, PEFT's way.

    Modules inside existing LoRA-FA layers are never selected; the model itself (name "") neither."""
    if target_modules is None:
        raise ValueError("target_modules must be given (a regex string, a list of names, or 'all-linear')")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a string or a non-empty list of strings, got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if isinstance(target_modules, str) and not all_linear:
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}") from None
    skip = _output_layer_names(model) if all_linear else set()
    found = []
    for name, mod in _walk(model):
        if not name:
            continue
        if exclude_modules and _target_matches(exclude_modules, name):
            continue
        if all_linear:
            if isinstance(mod, (nn.Linear, LoRAFALinear)) and name not in skip:
                found.append((name, mod))
        elif _target_matches(target_modules, name):
            found.append((name, mod))
    return found


def _linear_names(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in _walk(model) if n and isinstance(m, nn.Linear)]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def _replace(model: nn.Module, targets: Dict[int, nn.Module]) -> nn.Module:
    """Put ``targets[id(old)]`` at every place the old module is registered (shared modules too)."""
    if id(model) in targets:
        return targets[id(model)]
    for parent in list(model.modules()):
        if isinstance(parent, LoRAFALinear):
            continue
        for child_name, child in list(parent._modules.items()):  # named_children() skips repeats
            new = targets.get(id(child))
            if new is not None and new is not parent:
                setattr(parent, child_name, new)
    return model


def apply_lorafa(
    model: nn.Module,
    target_modules: TargetModules,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    correction: bool = True,
    *,
    init: str = "kaiming",
    rank_pattern: Optional[Dict[str, int]] = None,
    alpha_pattern: Optional[Dict[str, float]] = None,
    exclude_modules: Optional[TargetModules] = None,
    eps: float = 1e-6,
    adapter_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` modules that ``target_modules`` selects with ``LoRAFALinear`` layers
    (in place), freeze every other parameter and return the model.

    ``target_modules``: a regex (full match) or a list of names / name suffixes, as PEFT's, or
    "all-linear". ``rank_pattern`` / ``alpha_pattern``: per-module rank / alpha, as PEFT's.
    Raises ValueError when nothing matches, TypeError when a matched module is not an ``nn.Linear``.
    """
    _check_dropout(lora_dropout)
    _check_alpha(lora_alpha)
    _check_init(init)
    matched = match_target_modules(model, target_modules, exclude_modules)
    if not matched:
        raise ValueError(
            f"apply_lorafa: target_modules {target_modules!r} matched no module of the model "
            f"(its nn.Linear modules: {_linear_names(model)})"
        )
    for name, mod in matched:
        if isinstance(mod, LoRAFALinear) or _is_switched_peft_layer(mod):
            raise ValueError(f"apply_lorafa: module {name!r} already has a LoRA-FA adapter")
        if not isinstance(mod, nn.Linear):
            raise TypeError(
                f"apply_lorafa: target module {name!r} is a {type(mod).__name__}; only nn.Linear "
                "modules can be adapted (narrow target_modules)"
            )
    # Build every new layer before touching the model: a bad rank or alpha leaves it unchanged.
    new_layers: Dict[int, nn.Module] = {}
    for name, mod in matched:
        layer_r = pattern_value(rank_pattern, name, r)
        layer_alpha = pattern_value(alpha_pattern, name, lora_alpha)
        new_layers[id(mod)] = LoRAFALinear(
            mod, layer_r, layer_alpha, lora_dropout, use_rslora, correction, init,
            eps=eps, adapter_dtype=adapter_dtype,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return _replace(model, new_layers)


def lorafa_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) for every ``LoRAFALinear`` in the model."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAFALinear):
            yield name, mod


def lorafa_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable B matrices of the model's LoRA-FA layers (``LoRAFALinear`` and PEFT layers
    switched by ``from_peft``): pass them to ``torch.optim.AdamW``."""
    seen = set()
    for mod in model.modules():
        if isinstance(mod, LoRAFALinear):
            params = [mod.lora_B]
        elif _is_switched_peft_layer(mod):
            params = [lin.weight for lin in mod.lora_B.values()]
        else:
            continue
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def merge_adapters(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """``merge()`` every unmerged LoRA-FA layer of the model."""
    for _, layer in lorafa_layers(model):
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """``unmerge()`` every merged LoRA-FA layer of the model."""
    for _, layer in lorafa_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every LoRA-FA layer and put its (merged) ``nn.Linear`` back in its place."""
    layers = list(lorafa_layers(model))
    for _, layer in layers:
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
    return _replace(model, {id(layer): layer.base_layer for _, layer in layers})
