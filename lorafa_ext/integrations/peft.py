"""PEFT interoperability: ``save_adapter``, ``load_adapter`` and ``from_peft``.

peft, transformers and safetensors are optional: they are imported inside the functions that need
them, never when ``lorafa_ext`` is imported (``pip install lorafa_ext[peft]`` brings them).

The adapter directory is PEFT's LoRA format: ``adapter_config.json`` (peft_type "LORA", r, lora_alpha,
use_rslora, target_modules, rank_pattern, alpha_pattern, modules_to_save, ...) and
``adapter_model.safetensors`` with keys ``base_model.model.<module name>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), and ``base_model.model.<module name>.<key>`` for the state of every
module to save.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..model import (
    adapter_and_saved_parameters,
    check_modules_to_save,
    freeze_all_but,
    lorafa_layers,
    mark_modules_to_save,
    saved_modules,
    replace_modules,
)
from ..modules.base import ActiveAdapter, LoRAFALayer, check_dropout, check_eps, check_rank, is_plain_tensor
from ..modules.linear import LoRAFALinear
from .transformers import attach_checkpointing
from ..targets import ALL_LINEAR, match_target_modules, name_matches, pattern_value, walk

__all__ = ["save_adapter", "load_adapter", "from_peft", "AdapterError", "LoRAFAPeftLinear"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")

# LoraConfig fields naming features that LoRA-FA layers do not implement: (field, value that is fine)
_UNSUPPORTED_FIELDS = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "use_bdlora": (None, False, {}),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
}


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into the model (the model is left untouched)."""


# ====================================================================================== save


def _is_peft_model(model) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    return peft is not None and isinstance(model, getattr(peft, "PeftModel", ()))


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (whose names carry a prefix)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def _to_cpu(t: Tensor) -> Tensor:
    t = t.detach()
    if not is_plain_tensor(t) and not t.is_meta:
        t = t.full_tensor()  # DTensor (FSDP2): every rank must call save_adapter
    if t.is_meta:
        raise ValueError("save_adapter: the adapter weights are on the meta device (not materialised)")
    return t.to("cpu").contiguous().clone()


def _mode(values):
    return Counter(values).most_common(1)[0][0]


def _build_pattern(values: Dict[str, object], default) -> Dict[str, object]:
    """A PEFT rank/alpha pattern that resolves every name in ``values`` to its value."""
    non_default = sorted(((n, v) for n, v in values.items() if v != default), key=lambda kv: -kv[0].count("."))
    for key_of in (lambda n: n, re.escape):
        pat = {key_of(n): v for n, v in non_default}
        if all(pattern_value(pat, n, default) == v for n, v in values.items()):
            return pat
    # one escaped entry per layer, deepest first: a name's own key precedes any key matching a suffix of it
    return {re.escape(n): v for n, v in sorted(values.items(), key=lambda kv: -kv[0].count("."))}


def _target_modules_for(model: nn.Module, names: List[str]):
    wanted = set(names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if {n for n, _ in walk(model) if n and name_matches(leaves, n)} == wanted:
        return leaves
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def save_adapter(
    model: nn.Module,
    directory: str,
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> None:
    """Write the model's LoRA-FA adapters, and the state of its modules to save, as a PEFT LoRA
    adapter: ``adapter_model.safetensors`` and ``adapter_config.json`` in ``directory``, which
    ``peft.PeftModel.from_pretrained(base_model, directory)`` and ``load_adapter`` load. A PeftModel
    switched by ``from_peft`` is saved with its own ``save_pretrained``. Under FSDP2 every rank must
    call this (the shards are gathered); only rank 0 need keep the files."""
    model = _unwrap(model)
    if _is_peft_model(model):
        model.save_pretrained(directory)
        return
    from safetensors.torch import save_file

    layers = list(lorafa_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no LoRAFALinear layers (see lorafa_ext.apply_lorafa)")
    names = [n for n, _ in layers]
    tensors = {}
    for name, layer in layers:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _to_cpu(layer.lora_A)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _to_cpu(layer.lora_B)
    saved = list(saved_modules(model))
    for name, mod in saved:
        for key, value in mod.state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = _to_cpu(value)

    ranks = {n: layer.r for n, layer in layers}
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) == 1:
        use_rslora = rslora.pop()
        alphas = {n: layer.lora_alpha for n, layer in layers}
    else:  # mixed: express every scaling as alpha / r
        use_rslora = False
        alphas = {n: layer.scaling * layer.r for n, layer in layers}
    r = _mode(ranks.values())
    alpha = _mode(alphas.values())
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _mode(layer.lora_dropout for _, layer in layers),
        "use_rslora": use_rslora,
        "target_modules": _target_modules_for(model, names),
        "exclude_modules": None,
        "rank_pattern": _build_pattern(ranks, r),
        "alpha_pattern": _build_pattern(alphas, alpha),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": [n for n, _ in saved] or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }
    os.makedirs(directory, exist_ok=True)
    # write both files under temporary names first, then rename: never a half-written adapter
    fd, tmp_weights = tempfile.mkstemp(prefix=".adapter_model.", suffix=".tmp", dir=directory)
    os.close(fd)
    fd, tmp_config = tempfile.mkstemp(prefix=".adapter_config.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        os.replace(tmp_weights, os.path.join(directory, SAFETENSORS_NAME))
        os.replace(tmp_config, os.path.join(directory, CONFIG_NAME))
    finally:
        for tmp in (tmp_weights, tmp_config):
            if os.path.exists(tmp):
                os.remove(tmp)


# ====================================================================================== load


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory!r}")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise AdapterError(f"load_adapter: {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"load_adapter: {path} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"load_adapter: only LoRA adapters can be loaded, this one has peft_type={peft_type!r}")
    for field, fine in _UNSUPPORTED_FIELDS.items():
        value = config.get(field)
        if value not in fine and value != {}:
            raise AdapterError(
                f"load_adapter: the adapter uses {field}={value!r}, which LoRA-FA layers do not support"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"load_adapter: the adapter uses bias={bias!r}; only bias='none' is supported")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"load_adapter: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        raise AdapterError(f"load_adapter: lora_alpha must be a finite nonzero number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pat = config.get(name) or {}
        if not isinstance(pat, dict):
            raise AdapterError(f"load_adapter: {name} must be a mapping, got {pat!r}")
        for key, value in pat.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if name == "rank_pattern":
                ok = ok and isinstance(value, int) and value >= 1
            if not ok or (name == "alpha_pattern" and value == 0):
                raise AdapterError(f"load_adapter: {name}[{key!r}] = {value!r} is not valid")
            try:
                re.compile(key)
            except re.error as err:
                raise AdapterError(f"load_adapter: {name} key {key!r} is not a valid regex: {err}") from None
        config[name] = pat
    try:
        check_dropout(config.get("lora_dropout", 0.0), "load_adapter")
    except ValueError as err:
        raise AdapterError(str(err)) from None
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if not isinstance(saved, list) or not all(isinstance(s, str) and s for s in saved):
        raise AdapterError(f"load_adapter: modules_to_save must be a list of module names, got {saved!r}")
    config["modules_to_save"] = saved
    return config


def _read_weights(directory: str) -> Dict[str, Tensor]:
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(st_path):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("load_adapter needs safetensors: pip install 'lorafa_ext[peft]'") from err
        try:
            state = load_file(st_path, device="cpu")
        except Exception as err:  # SafetensorError, OSError, ...: a truncated or corrupted file
            raise AdapterError(
                f"load_adapter: {st_path} is not a valid safetensors file (corrupted or truncated?): {err}"
            ) from None
    elif os.path.isfile(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterError(f"load_adapter: cannot read {bin_path}: {err}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise AdapterError(f"load_adapter: {bin_path} does not hold a mapping of tensors")
    else:
        raise FileNotFoundError(f"load_adapter: no {SAFETENSORS_NAME} (or {BIN_NAME}) in {directory!r}")
    return state


def _saved_module_of(key: str, saved_names: List[str]) -> Optional[str]:
    """The module to save that ``key`` (a state-dict key) belongs to: the longest name that prefixes it."""
    owners = [n for n in saved_names if key.startswith(n + ".")]
    return max(owners, key=len) if owners else None


def _group_keys(
    state: Dict[str, Tensor], saved_names: List[str]
) -> Tuple[Dict[str, Dict[str, Tensor]], Dict[str, Dict[str, Tensor]]]:
    """({module: {"A": lora_A, "B": lora_B}}, {module to save: its state dict})."""
    grouped: Dict[str, Dict[str, Tensor]] = {}
    saved: Dict[str, Dict[str, Tensor]] = {}
    adapters = set()
    bad = []
    for key, value in state.items():
        plain = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        owner = _saved_module_of(plain, saved_names)
        if owner is not None:
            saved.setdefault(owner, {})[plain[len(owner) + 1:]] = value
            continue
        m = _KEY_RE.match(plain)
        if m is None:
            bad.append(key)
            continue
        module = m.group("module")
        if m.group("adapter") is not None:
            adapters.add(m.group("adapter"))
        slot = grouped.setdefault(module, {})
        if m.group("which") in slot:
            raise AdapterError(f"load_adapter: more than one lora_{m.group('which')} for module {module!r}")
        slot[m.group("which")] = value
    if bad:
        shown = ", ".join(sorted(bad)[:5]) + (" ..." if len(bad) > 5 else "")
        raise AdapterError(
            f"load_adapter: unexpected keys in the adapter weights (only lora_A.weight / lora_B.weight "
            f"of Linear layers and the state of modules_to_save are supported): {shown}"
        )
    if len(adapters) > 1:
        raise AdapterError(f"load_adapter: the weights hold several adapters {sorted(adapters)}; save one at a time")
    for module, slot in grouped.items():
        for which in ("A", "B"):
            if which not in slot:
                raise AdapterError(f"load_adapter: module {module!r} has no lora_{which}.weight in the adapter")
    if not grouped:
        raise AdapterError("load_adapter: the adapter weights hold no lora_A / lora_B tensors")
    return grouped, saved


def _plan_modules_to_save(model, modules, config, saved_state, adapted) -> List[Tuple[nn.Module, Dict[str, Tensor]]]:
    """Check the state of every module to save against the model; (module, state) pairs to load."""
    entries = config["modules_to_save"]
    plan = []
    for name, state in saved_state.items():
        mod = modules.get(name)
        if mod is None or isinstance(mod, LoRAFALayer):
            raise AdapterError(
                f"load_adapter: modules_to_save names {name!r}, which is not a plain module of the model"
            )
        own = mod.state_dict()
        if set(state) != set(own):
            raise AdapterError(
                f"load_adapter: the state of module to save {name!r} has keys {sorted(state)}, the module "
                f"{sorted(own)}"
            )
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise AdapterError(
                    f"load_adapter: shape mismatch for {name}.{key}: the adapter has {tuple(value.shape)}, "
                    f"the model {tuple(own[key].shape)}"
                )
        plan.append((mod, state))
    listed = [n for n, _ in walk(model) if n and name_matches(entries, n) and not isinstance(modules.get(n), LoRAFALayer)]
    missing = sorted(set(listed) - set(saved_state))
    if missing:
        raise AdapterError(f"load_adapter: modules_to_save {entries!r} selects modules with no weights in the adapter: {missing[:5]}")
    try:
        saved = list(saved_modules(model)) + [(n, modules[n]) for n in saved_state]
        check_modules_to_save(model, saved, adapted, "load_adapter")
    except ValueError as err:
        raise AdapterError(str(err)) from None
    return plan


def load_adapter(
    model: nn.Module,
    directory: str,
    *,
    correction: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Load a PEFT LoRA adapter directory into the model's LoRA-FA layers and return the model.

    Modules of the adapter that are already ``LoRAFALinear`` layers get its A, B, alpha, rsLoRA and
    dropout (their rank must match); plain ``nn.Linear`` modules are wrapped in new ``LoRAFALinear``
    layers (with ``correction``). The adapter's ``modules_to_save`` get their saved state and train in
    full. Afterwards the B's (earlier ones too) and the modules to save train, every other parameter is
    frozen, as ``apply_lorafa`` leaves them. r, lora_alpha, use_rslora, rank_pattern and alpha_pattern
    are read as PEFT reads them.

    Everything is checked before anything is written: on an error (AdapterError, a ValueError, for
    mismatched shapes, keys or rank, or a corrupted file) the model is left untouched.
    ``strict``: also an error when the model has LoRA-FA layers that the adapter does not cover.
    """
    wrapper, model = model, _unwrap(model)
    if _is_peft_model(model):
        raise TypeError(
            "load_adapter: this is a PeftModel; use its own load_adapter(directory, adapter_name) and then "
            "lorafa_ext.from_peft(model)"
        )
    config = _read_config(directory)
    modules = dict(walk(model))
    saved_names = [n for n in modules if n and name_matches(config["modules_to_save"], n)]
    grouped, saved_state = _group_keys(_read_weights(directory), saved_names)

    # 1. every adapter module exists and is adaptable
    for name in grouped:
        mod = modules.get(name)
        if mod is None:
            raise AdapterError(f"load_adapter: the adapter has weights for {name!r}, which is not a module of the model")
        if not isinstance(mod, (LoRAFALinear, nn.Linear)):
            raise AdapterError(
                f"load_adapter: module {name!r} is a {type(mod).__name__}; only nn.Linear / LoRAFALinear can be loaded"
            )
    # 2. target_modules (when it is a plain selection) agrees with the weights
    target_modules = config.get("target_modules")
    if target_modules is not None and not config.get("layers_to_transform"):
        try:
            targets = {
                n for n, m in match_target_modules(model, target_modules, config.get("exclude_modules"))
                if isinstance(m, (nn.Linear, LoRAFALinear))
            }
        except ValueError as err:
            raise AdapterError(f"load_adapter: bad target_modules in {CONFIG_NAME}: {err}") from None
        if str(target_modules).lower() != ALL_LINEAR:
            extra = sorted(set(grouped) - targets)
            missing = sorted(targets - set(grouped))
            if extra:
                raise AdapterError(
                    f"load_adapter: the adapter has weights for modules that its target_modules "
                    f"{target_modules!r} does not select: {extra[:5]}"
                )
            if missing:
                raise AdapterError(
                    f"load_adapter: target_modules {target_modules!r} selects modules that have no weights "
                    f"in the adapter: {missing[:5]}"
                )
    if strict:
        uncovered = sorted(n for n, m in modules.items() if isinstance(m, LoRAFALinear) and n not in grouped)
        if uncovered:
            raise AdapterError(
                f"load_adapter: the model has LoRA-FA layers that the adapter does not cover: {uncovered[:5]} "
                "(pass strict=False to keep their current weights)"
            )
    saved_plan = _plan_modules_to_save(model, modules, config, saved_state, [modules[n] for n in grouped])
    # 3. shapes and ranks; build everything new off the model
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    plan: List[Tuple[str, nn.Module, int, float, Tensor, Tensor]] = []  # name, module, r, alpha, A, B
    for name, slot in grouped.items():
        mod = modules[name]
        a, b = slot["A"], slot["B"]
        r = pattern_value(config["rank_pattern"], name, config.get("r", 8))
        alpha = pattern_value(config["alpha_pattern"], name, config.get("lora_alpha", 8))
        base = mod.base_layer if isinstance(mod, LoRAFALinear) else mod
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"load_adapter: {name!r}: lora_A / lora_B must be floating point, got {a.dtype} / {b.dtype}")
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(
                f"load_adapter: {name!r}: lora_A and lora_B must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"load_adapter: rank mismatch for {name!r}: the config gives r={r} but lora_A has shape "
                f"{tuple(a.shape)} and lora_B {tuple(b.shape)}"
            )
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise AdapterError(
                f"load_adapter: shape mismatch for {name!r}: the layer is {base.in_features} -> "
                f"{base.out_features}, so lora_A must be ({r}, {base.in_features}) and lora_B "
                f"({base.out_features}, {r}); got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if isinstance(mod, LoRAFALinear):
            if mod.r != r:
                raise AdapterError(f"load_adapter: rank mismatch for {name!r}: the layer has r={mod.r}, the adapter r={r}")
            if mod.merged:
                raise AdapterError(f"load_adapter: layer {name!r} is merged; unmerge() it before loading an adapter")
        else:
            try:
                LoRAFALinear.check_arguments(mod, r, alpha, dropout, where=f"load_adapter: layer {name!r}")
            except (TypeError, ValueError) as err:
                raise AdapterError(str(err)) from None
        plan.append((name, mod, r, alpha, a, b))

    # 4. build and write (nothing below can fail on a valid plan)
    keep = adapter_and_saved_parameters(model)
    new_layers = {}
    with torch.no_grad():
        for name, mod, r, alpha, a, b in plan:
            layer = mod if isinstance(mod, LoRAFALinear) else LoRAFALinear(
                mod, r, alpha, dropout, use_rslora, correction, name=name
            )
            a = a.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
            b = b.to(device=layer.lora_B.device, dtype=layer.lora_B.dtype)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.lora_alpha = alpha
            layer.use_rslora = use_rslora
            layer.lora_dropout = dropout
            layer.refresh_gram_inverse()
            if layer is not modules[name]:
                new_layers[id(modules[name])] = layer
        for mod, state in saved_plan:
            mod.load_state_dict(state)
    mark_modules_to_save(mod for mod, _ in saved_plan)
    keep += [layer.lora_B for layer in new_layers.values()]
    keep += [p for mod, _ in saved_plan for p in mod.parameters()]
    replaced = replace_modules(model, new_layers)
    freeze_all_but(replaced, keep)
    attach_checkpointing(replaced)
    if replaced is not model:  # the model itself was the one adapted Linear
        return replaced
    return wrapper


# ====================================================================================== from_peft


class _PeftLinearLoRAFA(LoRAFALayer):
    """The LoRA-FA side of ``LoRAFAPeftLinear`` (and of the switched bitsandbytes / torchao layers):
    PEFT's ``lora.Linear`` whose forward runs the LoRA-FA ops (``LoRAFALayer.forward``), with every
    lora_A frozen whatever PEFT switches."""

    @staticmethod
    def _gram_buffer(adapter: str) -> str:
        return f"lorafa_gram_inv_{adapter}"

    def lorafa_base_layer(self) -> nn.Linear:
        return self.get_base_layer()

    def lorafa_adapters(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        return {
            self._gram_buffer(a): (self.lora_A[a].weight, self.lora_B[a].weight) for a in self.lora_A if a in self.lora_B
        }

    def lorafa_active_adapter(self) -> Optional[ActiveAdapter]:
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None
        if len(active) > 1:
            raise NotImplementedError(
                f"lorafa_ext.from_peft: {len(active)} active adapters {active} on one layer; "
                "LoRA-FA layers run one active adapter at a time"
            )
        adapter = active[0]
        drop = self.lora_dropout[adapter]
        dropout_p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        return ActiveAdapter(
            self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], dropout_p,
            self._gram_buffer(adapter),
        )

    def lorafa_plain_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return super(LoRAFALayer, self).forward(x, *args, **kwargs)  # PEFT's own forward

    # PEFT sets requires_grad=True on the active adapter's A and B in these; LoRA-FA keeps A frozen.
    def set_adapter(self, *args, **kwargs):
        super().set_adapter(*args, **kwargs)
        self.freeze_lora_a()

    def enable_adapters(self, *args, **kwargs):
        super().enable_adapters(*args, **kwargs)
        self.freeze_lora_a()

    def set_requires_grad(self, *args, **kwargs):
        super().set_requires_grad(*args, **kwargs)
        self.freeze_lora_a()

    def update_layer(self, adapter_name, *args, **kwargs):
        """PEFT adds an adapter (``add_adapter``, ``load_adapter``): check it, freeze its A and cache its Gram inverse."""
        super().update_layer(adapter_name, *args, **kwargs)
        _check_peft_adapter(self, adapter_name, f"LoRAFAPeftLinear: adapter {adapter_name!r}")
        self.freeze_lora_a()
        self.refresh_gram_inverse()


_SWITCHED_CLASSES: Dict[type, type] = {}


def _switchable_classes() -> Dict[str, type]:
    """{name of the LoRA-FA class: the PEFT LoRA layer class it switches}: PEFT's lora.Linear and its
    bitsandbytes 4-bit and 8-bit layers (those only where PEFT defines them: bitsandbytes installed).
    A subclass (PEFT's torchao layer of lora.Linear) switches to a class of its own."""
    from peft.tuners.lora import bnb as peft_bnb
    from peft.tuners.lora.layer import Linear as PeftLinear

    classes = {"LoRAFAPeftLinear": PeftLinear}
    for name in ("Linear4bit", "Linear8bitLt"):
        if hasattr(peft_bnb, name):
            classes[f"LoRAFAPeft{name}"] = getattr(peft_bnb, name)
    return classes


def _switched_class(peft_cls: Optional[type] = None) -> type:
    """The PEFT LoRA layer class ``peft_cls`` (default: lora.Linear) with the LoRA-FA forward, built
    lazily (peft is optional): ``LoRAFAPeftLinear``, ``LoRAFAPeftLinear4bit``, ..."""
    if peft_cls is None:
        peft_cls = _switchable_classes()["LoRAFAPeftLinear"]
    if peft_cls not in _SWITCHED_CLASSES:
        names = {cls: name for name, cls in _switchable_classes().items()}
        name = names.get(peft_cls, f"LoRAFAPeft{peft_cls.__name__}")
        cls = type(name, (_PeftLinearLoRAFA, peft_cls), {"__module__": __name__})
        cls.__qualname__ = name
        _SWITCHED_CLASSES[peft_cls] = cls
    return _SWITCHED_CLASSES[peft_cls]


def __getattr__(name):  # lets pickle find the lazily built classes
    if name.startswith("LoRAFAPeft"):
        classes = _switchable_classes()
        if name in classes:
            return _switched_class(classes[name])
        for cls in _SWITCHED_CLASSES.values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _switchable(m: nn.Module) -> bool:
    """Whether the PEFT LoRA layer ``m`` can run as LoRA-FA: one of the switchable classes (or a
    subclass) over an ``nn.Linear`` (bitsandbytes' quantized layers are ``nn.Linear`` too), weights
    not stored transposed."""
    return (
        isinstance(m, tuple(_switchable_classes().values()))
        and isinstance(m.get_base_layer(), nn.Linear)
        and not getattr(m, "fan_in_fan_out", False)
    )


def _check_peft_adapter(m: nn.Module, adapter: str, where: str) -> None:
    """One adapter of a PEFT lora.Linear must be plain LoRA with values LoRA-FA accepts."""
    if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter, False):
        raise ValueError(f"{where} is a LoRA variant (DoRA, ...), not plain LoRA")
    if getattr(m, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"{where} uses lora_bias, which is not supported")
    drop = m.lora_dropout[adapter]
    check_dropout(drop.p if isinstance(drop, nn.Dropout) else 0.0, where)
    check_rank(m.r[adapter], m.get_base_layer().in_features, where)
    s = m.scaling[adapter]
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s != 0):
        raise ValueError(f"{where}: the scaling lora_alpha / r must be finite and nonzero, got {s!r}")


def from_peft(peft_model: nn.Module, *, correction: bool = True, eps: float = 1e-6) -> nn.Module:
    """Switch a PeftModel's LoRA ``Linear`` layers to the LoRA-FA ops, in place, and return it.

    lora_A is frozen (and stays frozen through ``set_adapter``, ``enable_adapter_layers`` and
    ``load_adapter``), and B's gradient gets the LoRA-FA correction (``correction=True``), so that
    ``torch.optim.AdamW(lorafa_ext.lorafa_parameters(model))`` trains LoRA-FA; that list also holds
    PEFT's modules_to_save. Everything else of the PeftModel (save_pretrained, merge_and_unload,
    adapters, ...) keeps working. Do not also use ``peft.optimizers.create_lorafa_optimizer``: it
    would apply the correction a second time.

    PEFT's LoRA layers over quantized bases switch too (QLoRA-FA): bitsandbytes ``Linear4bit`` (NF4,
    FP4) and ``Linear8bitLt``, and ``lora.Linear`` over a torchao-quantized ``nn.Linear``; their base
    layer runs its own quantized forward and the adapter branch runs ``torch.ops.lorafa.lowrank``.

    Every LoRA layer is checked before any is switched: a LoRA layer that cannot become LoRA-FA
    (Embedding, Conv, a GPT-2 Conv1D base, a GPTQ/AWQ/HQQ base, DoRA, ...) is a TypeError naming them
    all; an adapter value LoRA-FA rejects (lora_dropout outside [0, 1), r >= in_features) is a
    ValueError naming the layer.
    """
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("from_peft needs peft: pip install 'lorafa_ext[peft]'") from err
    check_eps(eps, "from_peft")
    lora_layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not lora_layers:
        raise ValueError("from_peft: the model has no PEFT LoRA layers to switch")
    unswitchable = []
    for name, m in lora_layers:
        if isinstance(m, _PeftLinearLoRAFA):
            continue
        if not isinstance(m, tuple(_switchable_classes().values())):
            unswitchable.append(f"{name} ({type(m).__name__})")
        elif not _switchable(m):
            kind = "lora.Linear" if type(m).__name__ == "Linear" else type(m).__name__
            unswitchable.append(f"{name} ({kind} over a {type(m.get_base_layer()).__name__})")
    if unswitchable:
        raise TypeError(
            f"from_peft: {len(unswitchable)} LoRA layers cannot run as LoRA-FA (only PEFT lora.Linear over an "
            "nn.Linear or a torchao-quantized one, and PEFT's bitsandbytes Linear4bit / Linear8bitLt, can), "
            f"and would train as plain LoRA: {', '.join(unswitchable)}. Leave them out of "
            "target_modules (or train such modules in full with modules_to_save)."
        )
    for name, m in lora_layers:  # check them all before switching any
        for adapter in m.lora_A:
            _check_peft_adapter(m, adapter, f"from_peft: layer {name!r} (adapter {adapter!r})")
    for _, m in lora_layers:
        if not isinstance(m, _PeftLinearLoRAFA):
            m.__class__ = _switched_class(type(m))
        m._init_lorafa(correction, eps)
        m.freeze_lora_a()
        m.refresh_gram_inverse()
    return peft_model
