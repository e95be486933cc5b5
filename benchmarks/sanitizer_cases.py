"""Small cases that run every lorafa kernel; gpu_check.py runs them under compute-sanitizer.

    python benchmarks/sanitizer_cases.py [--device cuda|cpu]

Each kernel runs on awkward sizes (tails in every tile dimension) and on every dtype path: fp32, bf16,
fp16 with fp32 adapters, fp64; with and without dropout and bias; non-contiguous x; N = 0. The sizes
are the smallest that reach each code path, so that the sanitizer's slowdown stays affordable. One
line per finished group; "sanitizer cases done" at the end (gpu_check.py looks for it). --device cpu
runs the same cases on the CPU backend (the GPU check's dry run).
"""
import argparse

import torch

import lorafa_ext  # noqa: F401

DTYPE_PAIRS = [  # (x, weight and bias dtype; adapter dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float64, torch.float64),
]
# (N, in, out, r): tails everywhere; N = 1; N = 0; 4-aligned widths (vector stores, one Philox call
# per 4 elements); 1000 rows (dB and dbias split over rows with a partial last split)
SHAPES = [(37, 70, 45, 5), (1, 33, 129, 40), (0, 16, 8, 2), (37, 64, 128, 16), (1000, 70, 45, 5)]


def run(device: str = "cuda") -> None:
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype)

    for x_dtype, lora_dtype in DTYPE_PAIRS:
        for n, n_in, out, r in SHAPES:
            for p in (0.0, 0.3):
                x = rnd(n, 2 * n_in, dtype=x_dtype)[:, ::2].requires_grad_()  # non-contiguous
                w, b = rnd(out, n_in, dtype=x_dtype), rnd(out, dtype=x_dtype).requires_grad_()
                a, lb = rnd(r, n_in, dtype=lora_dtype), rnd(out, r, dtype=lora_dtype).requires_grad_()
                y = torch.ops.lorafa.linear(x, w, b, a, lb, 0.7, p, True, 11)
                y.backward(torch.randn_like(y))
        print(f"linear {x_dtype} x, {lora_dtype} adapters: done", flush=True)
    # one row and one column with a stride-0 gradient (cuBLAS leading dimensions of size-1 operands)
    x = rnd(1, 1, dtype=torch.float32).expand(3, 1)[:1].requires_grad_()
    lb = rnd(1, 2, dtype=torch.float32).requires_grad_()
    y = torch.ops.lorafa.linear(x, rnd(1, 1, dtype=torch.float32), None, rnd(2, 1, dtype=torch.float32), lb, 1.0)
    y.sum().backward()
    seed = torch.tensor(5, device=dev)
    torch.ops.lorafa.dropout_mask(seed, 33, 71, 0.25)
    for r in (1, 16, 130):
        a = rnd(r, 257, dtype=torch.float32)
        gi = torch.ops.lorafa.gram_inverse(a, 1e-6)
        torch.ops.lorafa.correct_grad(rnd(77, r, dtype=torch.bfloat16), gi, 0.5)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("size-1 operands, dropout mask, Gram inverse, gradient correction: done")
    print("sanitizer cases done")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where the ops run (default cuda)")
    run(ap.parse_args().device)
