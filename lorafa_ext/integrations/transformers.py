"""transformers interoperability: checkpoints of ``apply_lorafa`` / ``load_adapter`` models.

``transformers.Trainer`` (and the trainers built on it, TRL's ``SFTTrainer``) save a
``PreTrainedModel`` with ``model.save_pretrained(directory, state_dict=..., is_main_process=...)``
and resume with ``model.load_state_dict(<directory>/model.safetensors, strict=False)``. When
``apply_lorafa`` or ``load_adapter`` adapts a ``PreTrainedModel`` it attaches two things to it:

- ``model.save_pretrained``: an ``AdapterSavePretrained`` (instance attribute, shadowing the
  class's method) that writes an adapter-only checkpoint, as a PeftModel does:
  ``adapter_config.json`` + ``adapter_model.safetensors`` (``lorafa_ext.save_adapter``, with
  base_model_name_or_path = the model's ``name_or_path``), which ``PeftModel.from_pretrained(base,
  directory)``, ``lorafa_ext.load_adapter`` and transformers' ``from_pretrained(directory)`` (base
  from base_model_name_or_path, then the adapter) load; and ``model.safetensors``, the trainable
  tensors (every lora_A, lora_B and module to save) under the model's own state-dict keys, which the
  Trainer's resume loads. No config.json is written, so ``from_pretrained(directory)`` never takes
  that partial ``model.safetensors`` for a whole model.
- a load_state_dict post-hook (``check_adapter_keys``) that raises when a state dict holds some of
  the model's adapter tensors but not all of them, or adapter tensors the model has no place for
  (resuming into a model adapted with other targets or ranks): a mismatch is an error, never
  adapters left at their initial values.

Both are plain picklable objects (they survive ``copy.deepcopy`` and pickling);
``merge_and_unload`` removes them. transformers and safetensors are imported only when a
checkpoint is written.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Set

from torch import nn

__all__ = ["AdapterSavePretrained", "attach_checkpointing", "detach_checkpointing", "adapter_state_keys",
           "check_adapter_keys"]

RESUME_WEIGHTS_NAME = "model.safetensors"  # the file the Trainer's resume loads into the model


def _is_pretrained_model(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")  # a PreTrainedModel exists only if transformers was imported
    return tf is not None and isinstance(model, getattr(tf, "PreTrainedModel", ()))


def adapter_state_keys(model: nn.Module) -> Set[str]:
    """The model's state-dict keys of its LoRA-FA adapters (``<layer>.lora_A``, ``<layer>.lora_B``,
    every name of a shared layer) and of its modules to save."""
    from ..model import MODULE_TO_SAVE_ATTR
    from ..modules.linear import LoRAFALinear

    keys = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(mod, LoRAFALinear):
            keys.update((prefix + "lora_A", prefix + "lora_B"))
        elif getattr(mod, MODULE_TO_SAVE_ATTR, False):
            keys.update(prefix + k for k in mod.state_dict())
    return keys


def check_adapter_keys(model: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: a state dict that holds some of the model's adapter tensors must
    hold all of them, and no lora_A / lora_B the model lacks."""
    expected = adapter_state_keys(model)
    missing = sorted(expected.intersection(incompatible_keys.missing_keys))
    if len(missing) == len(expected):
        return  # no adapter tensor in the state dict (a base checkpoint, a module's own state)
    unexpected = sorted(k for k in incompatible_keys.unexpected_keys if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    if missing or unexpected:
        raise RuntimeError(
            "load_state_dict: the state dict holds adapters that do not match the model's LoRA-FA layers "
            f"(missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}; without a layer here: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}); adapt the model with the same "
            "target_modules, ranks and modules_to_save as the run that saved it"
        )


class AdapterSavePretrained:
    """``model.save_pretrained`` of a LoRA-FA model: writes an adapter-only checkpoint (see the
    module's description). Takes ``save_pretrained``'s arguments; ``state_dict`` (given by the
    Trainer under FSDP / DeepSpeed) is the source of the tensors when it holds them."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __repr__(self) -> str:
        return f"<lorafa_ext adapter save_pretrained of {type(self.model).__name__}>"

    def __call__(self, save_directory, is_main_process: bool = True, state_dict: Optional[dict] = None,
                 push_to_hub: bool = False, safe_serialization: bool = True, **kwargs) -> None:
        if push_to_hub:
            raise NotImplementedError(
                "save_pretrained(push_to_hub=True) of a LoRA-FA model: save it, then upload the directory "
                "(huggingface_hub.upload_folder)"
            )
        if not safe_serialization:
            raise ValueError("save_pretrained of a LoRA-FA model writes safetensors only (safe_serialization=True)")
        if not is_main_process:
            return
        save_checkpoint(self.model, os.fspath(save_directory), state_dict)


def save_checkpoint(model: nn.Module, directory: str, state_dict: Optional[dict] = None) -> None:
    """Write the adapter-only checkpoint of ``model`` into ``directory``."""
    from safetensors.torch import save_file

    from .peft import _to_cpu, save_adapter

    keys = adapter_state_keys(model)
    source = state_dict if state_dict is not None and keys <= set(state_dict) else model.state_dict()
    missing = sorted(keys - set(source))
    if missing:  # pragma: no cover - a state dict from this model always holds them
        raise ValueError(f"save_pretrained: the state dict lacks the adapter tensors {missing[:5]}")
    tensors = {k: _to_cpu(source[k]) for k in sorted(keys)}
    name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    save_adapter(model, directory, base_model_name_or_path=name)
    save_file(tensors, os.path.join(directory, RESUME_WEIGHTS_NAME), metadata={"format": "pt"})


def attach_checkpointing(model: nn.Module) -> None:
    """Attach ``AdapterSavePretrained`` and ``check_adapter_keys`` to a ``PreTrainedModel`` (no-op
    for other modules, and when attached already)."""
    if not _is_pretrained_model(model):
        return
    if not isinstance(model.__dict__.get("save_pretrained"), AdapterSavePretrained):
        model.__dict__["save_pretrained"] = AdapterSavePretrained(model)
    if check_adapter_keys not in model._load_state_dict_post_hooks.values():
        model.register_load_state_dict_post_hook(check_adapter_keys)


def detach_checkpointing(model: nn.Module) -> None:
    """Remove what ``attach_checkpointing`` attached (``merge_and_unload``)."""
    if isinstance(model.__dict__.get("save_pretrained"), AdapterSavePretrained):
        del model.__dict__["save_pretrained"]
    hooks: List = [k for k, h in model._load_state_dict_post_hooks.items() if h is check_adapter_keys]
    for k in hooks:
        del model._load_state_dict_post_hooks[k]
