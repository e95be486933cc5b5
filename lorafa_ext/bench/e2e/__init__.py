"""End-to-end: training steps of a Llama-architecture model, every method (see protocol.py)."""
from .models import (
    MODEL_PRESETS,
    METHOD_LABELS,
    METHODS,
    QUANTS,
    TARGET_MODULES,
    E2EConfig,
    build_model,
    prepare,
    quantize_projections,
)
from .protocol import CKPT_SAVED_NOTE, available_methods, compare, run_e2e, run_one, time_rows

__all__ = ["MODEL_PRESETS", "METHOD_LABELS", "METHODS", "QUANTS", "TARGET_MODULES", "E2EConfig", "build_model",
           "prepare", "quantize_projections",
           "CKPT_SAVED_NOTE", "available_methods", "compare", "run_e2e", "run_one", "time_rows"]
