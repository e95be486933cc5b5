"""Benchmark internals for ``python -m lorafa_ext.bench`` and the scripts in ``benchmarks/``.

Modules:
    timing    side-by-side timers (CUDA events on a GPU, perf_counter on the CPU), medians
    variants  the layer variants that are timed (F.linear baseline, our op, PEFT's LoRA layers)
    micro     the shape sweep: one case = one shape, every variant measured side by side
    memory    saved-activation bytes (saved_tensors_hooks, unique storages) and peak CUDA memory
    e2e       a training step of a Llama-architecture model built from a transformers config
    report    console/markdown tables, results.json, PNG plots
    progress  a progress bar (tqdm when installed)

Only ``lorafa_ext.bench`` is meant to be imported by users; these modules may change.
"""
