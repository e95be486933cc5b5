"""Effectiveness experiments for lorafa_ext (optional; need the ``experiments`` extra).

``python -m lorafa_ext.experiments.genre --out DIR [--quick]``: fine-tune all-MiniLM-L6-v2 to tell
the genre (comedy, tragedy, history) of a Shakespeare passage with full fine-tuning, PEFT LoRA, PEFT's
LoRA-FA optimizer and our LoRA-FA layers with and without the gradient correction. See README.md in
this folder. ``import lorafa_ext`` never imports this package.
"""
