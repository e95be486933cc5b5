"""The machine a run happens on: device choice, its name, package versions, the backend's notes."""
from __future__ import annotations

import datetime
import os
import platform
import sys
import warnings

import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(s: str) -> torch.device:
    """"auto" (cuda when available), "cuda", "cuda:N" or "cpu"."""
    if s == "auto":
        return default_device()
    d = torch.device(s)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return d


def device_name(device) -> str:
    """The GPU's name, or "CPU <model name> (<threads> threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)".replace("  ", " ")


def module_versions(names) -> dict:
    """{module: __version__ or None when it does not import}."""
    out = {}
    for mod in names:
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional package is just "None"
            out[mod] = None
    return out


def backend_notes(device: torch.device) -> tuple:
    """(lorafa_ext backend name, notes on what it means for this run)."""
    import lorafa_ext

    backend = lorafa_ext.backend()
    notes = []
    if device.type == "cpu":
        notes.append("CPU run: sizes are the CPU preset's, not the GPU sweep; timings on a shared CPU are noisy "
                     "(figures marked ~ have a wide spread)")
    if backend == "python":
        notes.append("lorafa_ext backend is the pure-PyTorch fallback (no compiled extension)")
    elif device.type == "cuda" and backend != "cuda":
        msg = (f"lorafa_ext backend is {backend!r}: the compiled library has no CUDA kernels, so every lorafa "
               "variant fails on this GPU (rebuild with the CUDA toolkit: pip install --no-build-isolation -e .)")
        warnings.warn(msg)
        notes.append(msg)
    return backend, notes


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("lorafa_ext", "bench", "__main__.py")):
        argv = ["-m", "lorafa_ext.bench"] + argv[1:]
    return " ".join(["python"] + argv)


UNITS = {"*_us": "microseconds (median)", "*_spread": "relative interquartile range (Q3 - Q1) / median",
         "*_tflop_per_s": "TFLOP/s", "*_gb_per_s": "GB/s (1e9 B/s)", "*_gflop": "GFLOP (1e9 FLOPs)",
         "*_mb": "MB (1e6 bytes)", "*_mib": "MiB (2^20 bytes)", "*_gib": "GiB (2^30 bytes)", "*_bytes": "bytes",
         "step_ms": "milliseconds (median)", "tokens_per_s": "tokens per second (from the median step)",
         "*_vs_*": "time ratio (variant / baseline), median of per-round ratios",
         "speedup_vs_*": "time ratio (other / ours), median of per-round ratios",
         "noisy": "keys of the figures whose spread is too wide to support them (shown with ~)"}


def meta(device: torch.device, backend: str, preset: str, suites) -> dict:
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "backend": backend, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(), "preset": preset, "suites": list(suites),
            "threads": torch.get_num_threads(),
            **module_versions(("peft", "transformers", "matplotlib")), "units": UNITS}
