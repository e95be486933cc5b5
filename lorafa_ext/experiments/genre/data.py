"""The data of one run: tokenized passages per split, the class-balanced batch sampler, the summary."""
from __future__ import annotations

from typing import Optional

import torch

from .. import shakespeare as shk
from .config import Size


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


def _evenly(n: int, k: Optional[int]) -> torch.Tensor:
    """k indices of range(n), evenly spaced (all of them for k None or k >= n)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.tensor([(j * n) // k for j in range(k)], dtype=torch.long)


def prepare_data(size: Size, model_dir: str, texts_dir: Optional[str]):
    """(data, full, tokens per play): the evaluated passages of each split, every passage of each
    split, and each play's token count. data["val"] holds size.val_passages passages, evenly over the
    validation plays; data["val_curve"] is an evenly spaced subset of it, at data["val_curve_index"]
    (the validation curve); data["test"] is capped per play by size.test_cap."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.model_max_length = 10 ** 9  # we cut windows ourselves; silences the length warning
    plays = shk.load_plays(texts_dir, max_chars=size.max_chars)
    tokens = shk.tokenize_plays(plays, tok)
    full = {split: shk.passages(tokens, pl, size.seq_len, tok.cls_token_id, tok.sep_token_id)
            for split, pl in shk.SPLITS.items()}
    val_cap = None if size.val_passages is None else -(-size.val_passages // len(shk.VAL_PLAYS))
    val = shk.passages(tokens, shk.VAL_PLAYS, size.seq_len, tok.cls_token_id, tok.sep_token_id, val_cap)
    val = val.subset(_evenly(len(val), size.val_passages))
    curve_index = _evenly(len(val), size.curve_passages)
    data = {
        "train": full["train"],
        "val": val,
        "val_curve": val.subset(curve_index),
        "val_curve_index": curve_index,
        "test": shk.passages(tokens, shk.TEST_PLAYS, size.seq_len, tok.cls_token_id, tok.sep_token_id,
                             size.test_cap),
    }
    tokens_per_play = {p: len(t) for p, t in tokens.items()}
    return data, full, tokens_per_play


def init_batches(train: shk.Passages, size: Size, seed: int):
    """The batches init_from_data sees for a seed: size.init_batches class-balanced batches of
    (input_ids, labels), from their own generator (the training batches are not consumed)."""
    sampler = BalancedSampler(train.labels, size.batch, 50_000 + seed)
    return [(train.input_ids[ix], train.labels[ix]) for ix in (sampler.next() for _ in range(size.init_batches))]


def data_summary(data, full, tokens_per_play) -> dict:
    """Plays, splits, passage counts and the constant-answer baselines, for results.json."""
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
        "passages_used": {s: data[s].counts() for s in ("train", "val", "test")},
        "val_curve_passages": len(data["val_curve"]),
        "train_sampling": "class-balanced (a genre uniformly at random, then a passage of it)",
        "majority_class": majority,
        "majority_baseline": {s: float((data[s].labels == maj_ix).float().mean()) for s in ("val", "test")},
        "best_constant_baseline": {s: max(data[s].counts().values()) / len(data[s]) for s in ("val", "test")},
    }
