"""results.json: strict JSON (NaN and inf written as null)."""
from __future__ import annotations

import json
import math

import torch


def sanitize(obj, path="", found=None):
    """Replace NaN/inf by None (JSON has no NaN); found collects the paths that had them."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            if found is not None:
                found.append(path)
            return None
        return obj
    if isinstance(obj, dict):
        return {str(k): sanitize(v, f"{path}.{k}", found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: str, results: dict) -> list:
    found: list = []
    clean = sanitize(results, "", found)
    with open(path, "w") as f:
        json.dump(clean, f, indent=1, allow_nan=False)
        f.write("\n")
    return found
