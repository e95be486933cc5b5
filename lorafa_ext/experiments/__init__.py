"""Effectiveness experiments for lorafa_ext (optional; need the ``experiments`` extra).

``python -m lorafa_ext.experiments.genre --out DIR [--quick]``: fine-tune all-MiniLM-L6-v2 to tell
the genre (comedy, tragedy, history) of a Shakespeare passage with full fine-tuning, PEFT LoRA (kaiming
and PiSSA), PEFT's LoRA-FA optimizer and our LoRA-FA layers (kaiming A with and without the correction,
A from ``init_from_data``, AdamW and SGD), paired against PEFT LoRA. See README.md in this folder. ``import lorafa_ext`` never imports this package.
"""
