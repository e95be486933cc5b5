"""Which modules of a model get an adapter: PEFT's ``target_modules``, ``exclude_modules``,
``modules_to_save``, ``rank_pattern`` and ``alpha_pattern`` rules, used by ``apply_lorafa``,
``load_adapter`` and ``save_adapter``.

- A string ``target_modules`` is a regular expression that must match a module's full name
  (``re.fullmatch``); ``"all-linear"`` selects every ``nn.Linear`` except the output layer of a
  transformers model (``get_output_embeddings()``).
- A list (``target_modules``, ``exclude_modules``, ``modules_to_save``) matches a module whose full
  name is in the list or ends with ``"." + entry``.
- ``rank_pattern`` / ``alpha_pattern``: the first key (a regular expression) matching the end of a
  module's name, ``re.match(rf"(.*\\.)?({key})$", name)``, gives that module's rank / alpha.

Modules inside LoRA-FA layers (their ``base_layer``) are never selected.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

from .modules.base import LoRAFALayer

__all__ = [
    "ALL_LINEAR",
    "TargetModules",
    "pattern_value",
    "name_matches",
    "walk",
    "match_target_modules",
    "match_modules_to_save",
    "linear_names",
]

TargetModules = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


def pattern_value(pattern: Optional[Dict[str, object]], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key matching ``name``."""
    for key in (pattern or {}):
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def name_matches(selection: TargetModules, name: str) -> bool:
    """Whether ``selection`` (a regex string, or a list of names / name suffixes) selects ``name``."""
    if isinstance(selection, str):
        return re.fullmatch(selection, name) is not None
    return name in selection or any(name.endswith("." + t) for t in selection)


def walk(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """named_modules() that does not descend into LoRA-FA layers (their base_layer is not a target)."""
    stack = [("", model)]
    seen = set()
    while stack:
        name, mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield name, mod
        if isinstance(mod, LoRAFALayer):
            continue
        children = list(mod.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


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


def _check_selection(selection, what: str) -> TargetModules:
    if not isinstance(selection, str):
        selection = list(selection)
        if not selection or not all(isinstance(t, str) for t in selection):
            raise ValueError(f"{what} must be a string or a non-empty list of strings, got {selection!r}")
    elif selection.lower() != ALL_LINEAR:
        try:
            re.compile(selection)
        except re.error as err:
            raise ValueError(f"{what} {selection!r} is not a valid regular expression: {err}") from None
    return selection


def match_target_modules(
    model: nn.Module, target_modules: TargetModules, exclude_modules: Optional[TargetModules] = None
) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` that ``target_modules`` selects, PEFT's way.

    Modules inside existing LoRA-FA layers are never selected; the model itself (name "") neither."""
    if target_modules is None:
        raise ValueError("target_modules must be given (a regex string, a list of names, or 'all-linear')")
    target_modules = _check_selection(target_modules, "target_modules")
    if exclude_modules is not None:
        exclude_modules = _check_selection(exclude_modules, "exclude_modules")
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    skip = _output_layer_names(model) if all_linear else set()
    found = []
    for name, mod in walk(model):
        if not name:
            continue
        if exclude_modules is not None and name_matches(exclude_modules, name):
            continue
        if all_linear:
            if isinstance(mod, (nn.Linear, LoRAFALayer)) and name not in skip:
                found.append((name, mod))
        elif name_matches(target_modules, name):
            found.append((name, mod))
    return found


def match_modules_to_save(model: nn.Module, modules_to_save: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs that ``modules_to_save`` (a list of names / name suffixes) selects;
    ValueError when an entry selects nothing."""
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    entries = list(modules_to_save)
    if not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    found = [(n, m) for n, m in walk(model) if n and name_matches(entries, n)]
    for entry in entries:
        if not any(name_matches([entry], n) for n, _ in found):
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module of the model (modules: "
                f"{_names(n for n, _ in walk(model) if n and '.' not in n)})"
            )
    return found


def _names(names, limit: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def linear_names(model: nn.Module, limit: int = 8) -> str:
    """The names of the model's nn.Linear modules, for error messages."""
    return _names((n for n, m in walk(model) if n and isinstance(m, nn.Linear)), limit)
