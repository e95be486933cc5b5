"""PEFT interoperability: ``save_adapter``, ``load_adapter`` and ``from_peft``.

peft, transformers and safetensors are optional: they are imported inside the functions that need
them, never when ``lorafa_ext`` is imported (``pip install lorafa_ext[peft]`` brings them).

The adapter directory is PEFT's LoRA format: ``adapter_config.json`` (peft_type "LORA", r, lora_alpha,
use_rslora, target_modules, rank_pattern, alpha_pattern, ...) and ``adapter_model.safetensors`` with
keys ``base_model.model.<module name>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).
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

from .layers import LoRAFALinear, _GramCacheMixin, _is_plain_tensor
from .model import (
    ALL_LINEAR,
    _replace,
    _target_matches,
    _walk,
    lorafa_layers,
    match_target_modules,
    pattern_value,
)

__all__ = ["save_adapter", "load_adapter", "from_peft", "AdapterError"]

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
    "modules_to_save": (None, []),
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
    if not _is_plain_tensor(t) and not t.is_meta:
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
    if {n for n, _ in _walk(model) if n and _target_matches(leaves, n)} == wanted:
        return leaves
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def save_adapter(
    model: nn.Module,
    directory: str,
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> None:
    """Write the model's LoRA-FA adapters as a PEFT LoRA adapter: ``adapter_model.safetensors`` and
    ``adapter_config.json`` in ``directory``, which ``peft.PeftModel.from_pretrained(base_model,
    directory)`` loads. A PeftModel switched by ``from_peft`` is saved with its own ``save_pretrained``.
    Under FSDP2 every rank must call this (the shards are gathered); only rank 0 need keep the files."""
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
        "modules_to_save": None,
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
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"load_adapter: lora_dropout must be in [0, 1), got {dropout!r}")
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


def _group_keys(state: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
    grouped: Dict[str, Dict[str, Tensor]] = {}
    adapters = set()
    bad = []
    for key, value in state.items():
        m = _KEY_RE.match(key)
        if m is None:
            bad.append(key)
            continue
        module = m.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
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
            f"of Linear layers are supported): {shown}"
        )
    if len(adapters) > 1:
        raise AdapterError(f"load_adapter: the weights hold several adapters {sorted(adapters)}; save one at a time")
    for module, slot in grouped.items():
        for which in ("A", "B"):
            if which not in slot:
                raise AdapterError(f"load_adapter: module {module!r} has no lora_{which}.weight in the adapter")
    if not grouped:
        raise AdapterError("load_adapter: the adapter weights hold no lora_A / lora_B tensors")
    return grouped


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
    layers (with ``correction``) and every other parameter is frozen, as ``apply_lorafa`` does.
    r, lora_alpha, use_rslora, rank_pattern and alpha_pattern are read as PEFT reads them.

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
    grouped = _group_keys(_read_weights(directory))

    modules = dict(_walk(model))
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
    # 3. shapes and ranks; build everything new off the model
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    plan: List[Tuple[str, nn.Module, int, float, Tensor, Tensor]] = []
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
            target = mod
        else:
            target = LoRAFALinear(mod, r, alpha, dropout, use_rslora, correction)  # built off the model
        dev, dt = target.lora_A.device, target.lora_A.dtype
        plan.append((name, target, r, alpha, a.to(device=dev, dtype=dt), b.to(device=dev, dtype=dt)))

    # 4. write (nothing below can fail on a valid plan)
    new_layers = {}
    with torch.no_grad():
        for name, layer, r, alpha, a, b in plan:
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.lora_alpha = alpha
            layer.use_rslora = use_rslora
            layer.lora_dropout = dropout
            layer.refresh_gram_inverse()
            if layer is not modules[name]:
                new_layers[id(modules[name])] = layer
    if new_layers:
        for p in model.parameters():
            p.requires_grad_(False)
        replaced = _replace(model, new_layers)
        for layer in new_layers.values():
            layer.lora_B.requires_grad_(True)
        if replaced is not model:  # the model itself was the one adapted Linear
            return replaced
    return wrapper


# ====================================================================================== from_peft


class _PeftLinearMixin(_GramCacheMixin):
    """Forward of a PEFT ``lora.Linear`` through ``torch.ops.lorafa.linear`` (mixed in by from_peft)."""

    _lorafa_switched = True

    @staticmethod
    def _lorafa_buf(adapter: str) -> str:
        return f"lorafa_gram_inv_{adapter}"

    def refresh_gram_inverse(self) -> None:
        for adapter, lin in self.lora_A.items():
            self._refresh_gram(self._lorafa_buf(adapter), lin.weight, self._lorafa_eps)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh_gram_inverse()
        return self

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return super().forward(x)
        if len(active) > 1:
            raise NotImplementedError(
                f"lorafa_ext.from_peft: {len(active)} active adapters {active} on one layer; "
                "LoRA-FA layers run one active adapter at a time"
            )
        adapter = active[0]
        lora_a = self.lora_A[adapter].weight
        lora_b = self.lora_B[adapter].weight
        if lora_a.requires_grad and not torch.compiler.is_compiling():
            lora_a.requires_grad_(False)  # PeftModel.set_adapter() unfreezes A; LoRA-FA keeps it frozen
        base = self.get_base_layer()
        drop = self.lora_dropout[adapter]
        dropout_p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        correction = self._lorafa_correction and torch.is_grad_enabled() and lora_b.requires_grad
        gram_inv = self._cached_gram(self._lorafa_buf(adapter), lora_a, self._lorafa_eps) if correction else None
        return torch.ops.lorafa.linear(
            x, base.weight, base.bias, lora_a, lora_b, self.scaling[adapter], dropout_p, correction, None,
            self._lorafa_eps, gram_inv,
        )


_SWITCHED_CLASS = None


def _switched_class():
    """``LoRAFAPeftLinear``: PEFT's lora.Linear with our forward (built lazily: peft is optional)."""
    global _SWITCHED_CLASS
    if _SWITCHED_CLASS is None:
        from peft.tuners.lora.layer import Linear as PeftLinear

        cls = type("LoRAFAPeftLinear", (_PeftLinearMixin, PeftLinear), {"__module__": __name__})
        cls.__qualname__ = "LoRAFAPeftLinear"
        _SWITCHED_CLASS = cls
    return _SWITCHED_CLASS


def __getattr__(name):  # lets pickle find the lazily built class
    if name == "LoRAFAPeftLinear":
        return _switched_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refresh_peft_after_load(module, incompatible_keys) -> None:
    module.refresh_gram_inverse()


def from_peft(peft_model: nn.Module, *, correction: bool = True, eps: float = 1e-6) -> nn.Module:
    """Switch a PeftModel's LoRA ``Linear`` layers to the LoRA-FA ops, in place, and return it.

    lora_A is frozen, and B's gradient gets the LoRA-FA correction (``correction=True``), so that
    ``torch.optim.AdamW(lorafa_ext.lorafa_parameters(model))`` trains LoRA-FA. Everything else of the
    PeftModel (save_pretrained, merge_and_unload, adapters, ...) keeps working. Do not also use
    ``peft.optimizers.create_lorafa_optimizer``: it would apply the correction a second time.
    """
    try:
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("from_peft needs peft: pip install 'lorafa_ext[peft]'") from err
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"from_peft: eps must be finite and >= 0, got {eps}")
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, PeftLinear)]
    if not layers:
        raise ValueError("from_peft: the model has no PEFT LoRA Linear layers to switch")
    for name, m in layers:  # check them all before switching any
        base = m.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"from_peft: {name!r} wraps a {type(base).__name__}; only nn.Linear base layers are supported"
            )
        if getattr(m, "fan_in_fan_out", False):
            raise ValueError(f"from_peft: {name!r} uses fan_in_fan_out=True, which is not supported")
        for adapter in m.lora_A:
            if adapter in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(adapter, False):
                raise ValueError(
                    f"from_peft: {name!r} adapter {adapter!r} is a LoRA variant (DoRA, ...), not plain LoRA"
                )
            if getattr(m, "lora_bias", {}).get(adapter, False):
                raise ValueError(f"from_peft: {name!r} adapter {adapter!r} uses lora_bias, which is not supported")
    cls = _switched_class()
    for name, m in layers:
        for lin in m.lora_A.values():
            lin.weight.requires_grad_(False)
        if not isinstance(m, cls):
            m.__class__ = cls
            m._init_gram_cache()
            m.register_load_state_dict_post_hook(_refresh_peft_after_load)
        m._lorafa_correction = bool(correction)
        m._lorafa_eps = float(eps)
        for adapter, lin in m.lora_A.items():
            buf = m._lorafa_buf(adapter)
            if buf not in m._buffers:
                m.register_buffer(buf, None, persistent=False)
        m.refresh_gram_inverse()
    return peft_model
