"""Applying LoRA-FA to a whole model: ``apply_lorafa``, ``lorafa_parameters`` and helpers.

Which modules are adapted follows PEFT's rules (``lorafa_ext.targets``). After ``apply_lorafa`` (and
``load_adapter``, ``from_peft``) exactly these parameters train: every adapter's B and the
parameters of the ``modules_to_save`` (modules trained in full, such as a new classifier head);
``lorafa_parameters(model)`` lists them.
"""
from __future__ import annotations

import sys
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .integrations.transformers import attach_checkpointing, detach_checkpointing
from .modules.base import LoRAFALayer, check_alpha, check_dropout, check_eps
from .modules.linear import LoRAFALinear, check_init
from .targets import (
    ALL_LINEAR,
    TargetModules,
    linear_names,
    match_modules_to_save,
    match_target_modules,
    pattern_value,
)

__all__ = [
    "apply_lorafa",
    "lorafa_parameters",
    "lorafa_layers",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "saved_modules",
    "mark_modules_to_save",
    "replace_modules",
    "freeze_all_but",
    "adapter_and_saved_parameters",
    "check_modules_to_save",
    # target selection, defined in lorafa_ext.targets
    "ALL_LINEAR",
    "match_target_modules",
    "pattern_value",
]

# attribute set on a module that trains in full (``apply_lorafa(..., modules_to_save=...)``)
MODULE_TO_SAVE_ATTR = "_lorafa_module_to_save"


def _peft_saved_module_type():
    """PEFT's wrapper of its modules_to_save, when peft has been imported (else None)."""
    other = sys.modules.get("peft.utils.other")
    return getattr(other, "AuxiliaryTrainingWrapper", None) or getattr(other, "ModulesToSaveWrapper", None)


def saved_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of every module trained in full: those given to ``apply_lorafa`` /
    ``load_adapter`` as ``modules_to_save`` and PEFT's ModulesToSaveWrapper modules."""
    peft_type = _peft_saved_module_type()
    for name, mod in model.named_modules():
        if getattr(mod, MODULE_TO_SAVE_ATTR, False) or (peft_type is not None and isinstance(mod, peft_type)):
            yield name, mod


def mark_modules_to_save(mods: Iterable[nn.Module]) -> None:
    """Mark modules as trained in full and make their parameters trainable."""
    for mod in mods:
        setattr(mod, MODULE_TO_SAVE_ATTR, True)
        mod.requires_grad_(True)


def lorafa_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, layer) for every ``LoRAFALinear`` in the model."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRAFALinear):
            yield name, mod


def adapter_and_saved_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The B's of the model's LoRA-FA layers and the parameters of its modules to save, those that
    require grad, each once (``lorafa_parameters`` without its check)."""
    params: List[nn.Parameter] = []
    seen = set()
    groups = [mod.adapter_parameters() for mod in model.modules() if isinstance(mod, LoRAFALayer)]
    groups += [mod.parameters() for _, mod in saved_modules(model)]
    for group in groups:
        for p in group:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def lorafa_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter that LoRA-FA training updates, each once: the B of every LoRA-FA layer
    (``LoRAFALinear`` and PEFT layers switched by ``from_peft``; the active adapter's) and the
    parameters of the modules to save, those that require grad. Pass them to ``torch.optim.AdamW``.

    Warns when other parameters of the model require grad: a Trainer (which optimises every
    parameter that requires grad) would train them, an optimizer over this list would not."""
    params = adapter_and_saved_parameters(model)
    ids = {id(p) for p in params}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if others:
        warnings.warn(
            f"lorafa_parameters: {len(others)} parameters require grad but are neither an adapter's B nor "
            f"part of a module to save, and are left out: {others[:5]}{' ...' if len(others) > 5 else ''} "
            "(freeze them, or name their modules in modules_to_save)"
        )
    return iter(params)


def freeze_all_but(model: nn.Module, keep: Iterable[nn.Parameter]) -> None:
    """requires_grad=True on the parameters in ``keep``, False on every other parameter of the model."""
    keep_ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep_ids)


def replace_modules(model: nn.Module, targets: Dict[int, nn.Module]) -> nn.Module:
    """Put ``targets[id(old)]`` at every place the old module is registered (shared modules too);
    returns the model, or its replacement when the model itself is a target."""
    if id(model) in targets:
        return targets[id(model)]
    for parent in list(model.modules()):
        if isinstance(parent, LoRAFALayer):
            continue
        for child_name, child in list(parent._modules.items()):  # named_children() skips repeats
            new = targets.get(id(child))
            if new is not None and new is not parent:
                setattr(parent, child_name, new)
    return model


def check_modules_to_save(model: nn.Module, saved: Sequence[Tuple[str, nn.Module]], adapted: Iterable[nn.Module],
                          where: str) -> None:
    """A module to save must not be, or contain, an adapted layer (its A would train)."""
    adapted_ids = {id(m) for m in adapted} | {id(m) for m in model.modules() if isinstance(m, LoRAFALayer)}
    for name, mod in saved:
        for sub_name, sub in mod.named_modules():
            if id(sub) in adapted_ids:
                inner = f"{name}.{sub_name}" if sub_name else name
                raise ValueError(
                    f"{where}: modules_to_save selects {name!r}, which is or contains the adapted layer "
                    f"{inner!r}; a module is either adapted or trained in full"
                )


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
    modules_to_save: Optional[Sequence[str]] = None,
    eps: float = 1e-6,
    adapter_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` modules that ``target_modules`` selects with ``LoRAFALinear`` layers
    (in place) and return the model.

    ``target_modules``: a regex (full match) or a list of names / name suffixes, as PEFT's, or
    "all-linear". ``rank_pattern`` / ``alpha_pattern``: per-module rank / alpha, as PEFT's.
    ``modules_to_save``: names / name suffixes of modules trained in full (a new classifier head).
    Afterwards the B's (of these and of earlier adapters) and the modules to save train; every other
    parameter is frozen. A transformers ``PreTrainedModel`` gets an adapter-only ``save_pretrained``
    and a check of the adapter keys it loads, so that ``Trainer`` checkpoints reload and resume
    (``lorafa_ext.integrations.transformers``). Every argument is checked before the model is changed: ValueError when
    nothing matches or a value is out of range, TypeError when a matched module is not an ``nn.Linear``.
    """
    where = "apply_lorafa"
    check_alpha(lora_alpha, where)
    check_dropout(lora_dropout, where)
    check_eps(eps, where)
    check_init(init, where)
    matched = match_target_modules(model, target_modules, exclude_modules)
    if not matched:
        raise ValueError(
            f"apply_lorafa: target_modules {target_modules!r} matched no module of the model "
            f"(its nn.Linear modules: {linear_names(model)})"
        )
    for name, mod in matched:
        if isinstance(mod, LoRAFALayer):
            raise ValueError(f"apply_lorafa: module {name!r} already has a LoRA-FA adapter")
        if not isinstance(mod, nn.Linear):
            raise TypeError(
                f"apply_lorafa: target module {name!r} is a {type(mod).__name__}; only nn.Linear "
                "modules can be adapted (narrow target_modules)"
            )
    saved = []
    if modules_to_save is not None:
        try:
            saved = match_modules_to_save(model, modules_to_save)
        except ValueError as err:
            raise ValueError(f"apply_lorafa: {err}") from None
    check_modules_to_save(model, list(saved_modules(model)) + saved, [m for _, m in matched], where)
    # Check every layer's arguments, then build the layers: a bad rank or alpha leaves the model unchanged.
    args = {name: (pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, lora_alpha))
            for name, _ in matched}
    for name, mod in matched:
        LoRAFALinear.check_arguments(mod, *args[name], lora_dropout, init, eps, adapter_dtype,
                                     f"apply_lorafa: layer {name!r}")
    new_layers: Dict[int, nn.Module] = {
        id(mod): LoRAFALinear(mod, *args[name], lora_dropout, use_rslora, correction, init, eps=eps,
                              adapter_dtype=adapter_dtype, name=name)
        for name, mod in matched
    }
    keep = adapter_and_saved_parameters(model)
    model = replace_modules(model, new_layers)
    mark_modules_to_save(m for _, m in saved)
    keep += [layer.lora_B for layer in new_layers.values()]
    keep += [p for _, m in saved for p in m.parameters()]
    freeze_all_but(model, keep)
    attach_checkpointing(model)
    return model


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
    """Merge every LoRA-FA layer and put its (merged) ``nn.Linear`` back in its place. What
    ``apply_lorafa`` attached to a transformers model (``lorafa_ext.integrations.transformers``) is
    removed: ``save_pretrained`` writes the whole merged model again."""
    layers = list(lorafa_layers(model))
    for _, layer in layers:
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
    model = replace_modules(model, {id(layer): layer.base_layer for _, layer in layers})
    detach_checkpointing(model)
    return model
