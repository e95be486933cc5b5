"""results.md: the tables of a run, with how they were measured."""
from __future__ import annotations

import os

from ..stats import MIN_SAMPLES, NOISY_SPREAD
from .format import md_table
from .tables import (COMPARE_HEADERS, E2E_HEADERS, HEADLINE_HEADERS, MEMORY_HEADERS, MICRO_HEADERS, SUMMARY_HEADERS,
                     compare_table_rows, e2e_table_rows, headline_rows, memory_table_rows, micro_table_rows,
                     summary_rows)

NOISE_TEXT = (f"Spread is the interquartile range relative to the median. A figure or ratio marked ~ is noisy: "
              f"its spread exceeds {100 * NOISY_SPREAD:.0f}% or it rests on fewer than {MIN_SAMPLES} samples, so "
              f"it is an indication, not a result.")


def _skipped_lines(suite: dict) -> list:
    skipped = suite.get("skipped") or []
    if not skipped:
        return []
    return ["Skipped:", ""] + [f"- {s['case']} {s['variant']}: {s['reason']}" for s in skipped] + [""]


def _header(meta: dict) -> list:
    return ["# lorafa_ext benchmarks", "",
            f"- device: {meta['device_name']} ({meta['device']})",
            f"- torch {meta['torch']}, lorafa_ext backend: {meta['backend']}, "
            f"peft: {meta.get('peft') or 'not installed'}, transformers: {meta.get('transformers') or 'not installed'}",
            f"- date: {meta['date']}; command: `{meta['command']}`", "",
            "Times are medians of interleaved samples (every round takes one sample of every variant, in a "
            "rotating order, after warm-up; CUDA events on a GPU, perf_counter on the CPU), in microseconds. "
            "Ratios are medians of the per-round ratios. TFLOP/s and GB/s use each variant's own FLOPs and its "
            "compulsory traffic (every operand read once, every result written once). W and bias are frozen in "
            "every variant. " + NOISE_TEXT, ""]


def _micro(micro: dict) -> list:
    lines = []
    h = micro.get("headline")
    if h:
        lines += [f"## Headline ({h['shape']})", "", md_table(HEADLINE_HEADERS, headline_rows(h)), ""]
    if micro["cases"]:
        lines += ["## Microbenchmarks: summary", "", md_table(SUMMARY_HEADERS, summary_rows(micro["cases"])), "",
                  "## Microbenchmarks: every variant", "", md_table(MICRO_HEADERS, micro_table_rows(micro["cases"])),
                  ""]
    return lines + _skipped_lines(micro)


def _memory(mem: dict) -> list:
    return ["## Activation memory per layer", "",
            "Saved activations: unique storages saved for backward (saved_tensors_hooks), parameters "
            "excluded. Peak: CUDA max_memory_allocated during one forward+backward above what was "
            "allocated before it (CUDA only).", "",
            md_table(MEMORY_HEADERS, memory_table_rows(mem["cases"])), ""] + _skipped_lines(mem)


def _quant_note(c: dict) -> str:
    """How the decoder blocks' linear layers are stored, for a QLoRA run (config "quant")."""
    quant = c.get("quant", "none")
    return "" if quant == "none" else f" (bitsandbytes {quant}-quantized: QLoRA)"


def _e2e(e2e: dict) -> list:
    c = e2e["config"]
    mc = c["model_config"]
    return ["## End-to-end training step", "",
            f"Llama-architecture model from a transformers config, random weights: {c['model']} "
            f"(hidden {mc['hidden_size']}, intermediate {mc['intermediate_size']}, {mc['num_hidden_layers']} "
            f"layers, vocab {mc['vocab_size']}), {c['dtype']}, LoRA on every linear layer of the decoder "
            f"blocks{_quant_note(c)}, r = {c['r']}, alpha = {c['alpha']}. Step = forward + backward + optimizer. Memory is "
            f"measured with each method alone; speed with every method of one batch side by side: "
            f"{c['warmup']} warm-up steps each, then {c['steps']} interleaved rounds of one step each; "
            f"tokens/s from the median step.", "",
            md_table(E2E_HEADERS, e2e_table_rows(e2e["rows"])), "",
            "A method that runs out of memory is run again at half the batch until it fits (every attempt "
            "is a row above). The comparison is at the largest batch that fits every LoRA-type method "
            "(PEFT LoRA, PEFT LoRA-FA, ours); full fine-tuning is shown there when it fits, as OOM "
            "otherwise, and is not part of the goals (ours against PEFT LoRA, GPU only). Saved "
            "activations are n/a with gradient checkpointing (its own saved-tensor hooks hide them); "
            "peak memory is the measure there.", "",
            md_table(COMPARE_HEADERS, compare_table_rows(e2e["comparisons"])), ""]


def markdown(results: dict) -> str:
    lines = _header(results["meta"])
    if results.get("micro"):
        lines += _micro(results["micro"])
    if results.get("memory"):
        lines += _memory(results["memory"])
    if results.get("e2e"):
        lines += _e2e(results["e2e"])
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in results["plots"]] + [""]
    return "\n".join(lines)
