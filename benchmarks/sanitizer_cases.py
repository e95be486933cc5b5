"""Small CUDA cases that exercise every lorafa kernel once; run under compute-sanitizer by gpu_check.py.

Each kernel runs on awkward sizes (tails in every tile dimension) and on every dtype path: fp32, bf16,
fp16 with fp32 adapters, fp64; with and without dropout and bias; non-contiguous x; N = 0.
"""
import torch

import lorafa_ext  # noqa: F401


def run() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype)

    for x_dtype, lora_dtype in [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ]:
        # tails everywhere; N = 1; N = 0; 4-aligned widths (vector stores, one Philox call per 4
        # elements); 1000 rows (dB/dbias split over rows with a partial last split)
        for n, n_in, out, r in [(37, 70, 45, 5), (1, 33, 129, 40), (0, 16, 8, 2), (37, 64, 128, 16),
                                (1000, 70, 45, 5)]:
            for p in (0.0, 0.3):
                x = rnd(n, 2 * n_in, dtype=x_dtype)[:, ::2].requires_grad_()  # non-contiguous
                w, b = rnd(out, n_in, dtype=x_dtype), rnd(out, dtype=x_dtype).requires_grad_()
                a, lb = rnd(r, n_in, dtype=lora_dtype), rnd(out, r, dtype=lora_dtype).requires_grad_()
                y = torch.ops.lorafa.linear(x, w, b, a, lb, 0.7, p, True, 11)
                y.backward(torch.randn_like(y))
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
    torch.cuda.synchronize()
    print("sanitizer cases done")


if __name__ == "__main__":
    run()
