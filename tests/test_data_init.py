"""init_from_data: the subspace found against an independent fp64 SVD of the explicitly formed
statistic (the full-weight gradient from plain autograd, or the stacked inputs X), on data with a
planted low-rank structure; A's scale; output, base weights and freezing unchanged; grouped passes;
PEFT layers and save/load through PEFT; a 2-process gloo run; bad arguments."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lorafa_ext
from lorafa_ext import init_from_data
from lorafa_ext.layers import LoRAFALayer
from lorafa_ext.model import apply_lorafa, lorafa_layers, lorafa_parameters
from tests.helpers import ROOT

D_IN, D_HID, D_OUT = 23, 19, 21  # layer "0" has out < in, layer "2" out > in
RANKS = {"0": 3, "2": 5}  # rank_pattern: layer "2" gets r=5, layer "0" the default r=3
BATCH_ROWS = (7, 5, 9)  # awkward, unequal batch sizes
PLANTED = torch.tensor([1.0, 0.8, 0.62, 0.45, 0.3, 0.2], dtype=torch.float64)
# Wedin's bound: sin(angle) <= |error of the Gram| / gap; the Gram's error is about n * eps * lambda_1 (n ~ 20).
SIN_FACTOR = 50.0


# ---------------------------------------------------------------------------------- helpers


def plain_model(seed=0):
    """Two Linear layers around a tanh, fp64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT)).double()


def lorafa_model(plain, dtype, **kw):
    model = copy.deepcopy(plain).to(dtype)
    apply_lorafa(model, ["0", "2"], r=RANKS["0"], lora_alpha=6, rank_pattern={"2": RANKS["2"]}, **kw)
    return model


def planted_batches(seed=0, noise=1e-3):
    """x = z diag(PLANTED) M + noise: inputs close to a 6-dimensional subspace with distinct scales;
    t: the weights of the linear loss sum(y * t), so that dy of the last layer is t. fp64."""
    g = torch.Generator().manual_seed(100 + seed)
    m = torch.linalg.qr(torch.randn(D_IN, len(PLANTED), generator=g, dtype=torch.float64)).Q.T
    out = []
    for rows in BATCH_ROWS:
        z = torch.randn(rows, len(PLANTED), generator=g, dtype=torch.float64)
        x = (z * PLANTED) @ m * 3.0 + noise * torch.randn(rows, D_IN, generator=g, dtype=torch.float64)
        t = torch.randn(rows, D_OUT, generator=g, dtype=torch.float64)
        out.append((x, t))
    return out


def cast(batches, dtype):
    return [(x.to(dtype), t.to(dtype)) for x, t in batches]


def linear_loss(model, batch):
    x, t = batch
    return (model(x) * t).sum()


def reference_gradients(plain, batches):
    """{layer name: sum over batches of dL/dW} from plain fp64 autograd on the weights."""
    model = copy.deepcopy(plain)
    for p in model.parameters():
        p.requires_grad_(True)
    for x, t in batches:
        linear_loss(model, (x.double(), t.double())).backward()
    return {name: model[int(name)].weight.grad.clone() for name in RANKS}


def reference_inputs(plain, batches):
    """{layer name: X, the stacked inputs of that layer}, fp64."""
    xs = torch.cat([x.double() for x, _ in batches])
    return {"0": xs, "2": torch.tanh(plain[0](xs)).detach()}


def top_right_singular(mat, r):
    """Top-r right singular vectors (rows) and singular values, by an fp64 SVD."""
    _, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    return vh[:r], s


def sin_angle(rows_a, rows_b):
    """sin of the largest principal angle between the row spaces of two (r, n) matrices."""
    qa = torch.linalg.qr(rows_a.double().T).Q
    qb = torch.linalg.qr(rows_b.double().T).Q
    return torch.linalg.matrix_norm(qa - qb @ (qb.T @ qa), ord=2).item()


def sin_tolerance(s, r, dtype):
    """Wedin-style allowance for the statistic's rounding: factor * eps * s_1^2 / (s_r^2 - s_{r+1}^2)."""
    s = s.double()
    nxt = s[r] if s.numel() > r else torch.zeros((), dtype=torch.float64)
    eps = torch.finfo(dtype if dtype == torch.float64 else torch.float32).eps
    return SIN_FACTOR * eps * (s[0] ** 2 / (s[r - 1] ** 2 - nxt ** 2)).item()


def layer_a(model, name):
    return dict(lorafa_layers(model))[name].lora_A.detach()


# ---------------------------------------------------------------------------------- subspace


def captured_gradients(model, batches):
    """{layer name: sum over batches of dy^T x} of a low-precision LoRA-FA model, formed in fp64 from the
    x and dy that its own forward / backward produce (module hooks): the reference for bf16."""
    seen = {name: [] for name in RANKS}
    handles = []
    for name, layer in lorafa_layers(model):
        handles.append(layer.register_forward_hook(lambda m, args, out, n=name: seen[n].append([args[0]])))
        handles.append(layer.register_full_backward_hook(lambda m, gin, gout, n=name: seen[n][-1].append(gout[0])))
    with warnings.catch_warnings():  # "no inputs require gradients": dy is all we need
        warnings.simplefilter("ignore", UserWarning)
        for batch in batches:
            linear_loss(model, batch).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {n: sum(dy.double().T @ x.double() for x, dy in pairs) for n, pairs in seen.items()}


@pytest.mark.parametrize(
    "method,dtype",
    [(m, d) for m in ("gradient", "activation") for d in (torch.float64, torch.float32, torch.bfloat16)],
    ids=lambda v: {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(v, v),
)
def test_subspace_matches_fp64_svd(method, dtype):
    plain = plain_model()
    batches = cast(planted_batches(), dtype)
    model = lorafa_model(plain, dtype)
    low = dtype == torch.bfloat16
    if method == "gradient":
        # bf16: the reference is formed in fp64 from the bf16 model's own x and dy, not from an fp64 model
        stats = captured_gradients(model, batches) if low else reference_gradients(plain, batches)
        init_from_data(model, batches, "gradient", loss_fn=linear_loss)
    else:
        # non-contiguous inputs; the default forward model(batch) for tensor batches
        init_from_data(model, [x.t().contiguous().t() for x, _ in batches], "activation")
        stats = reference_inputs(plain, batches)
    # bf16 activations: only layer "0" sees exactly the bf16 batches; layer "2" a bf16 forward's rounding
    names = ["0"] if low and method == "activation" else list(RANKS)
    for name in names:
        r = RANKS[name]
        ref, s = top_right_singular(stats[name], r)
        a = layer_a(model, name)
        assert a.shape == (r, ref.shape[1])
        tol = sin_tolerance(s, r, dtype)
        assert tol < 1e-2, f"{name}: the planted structure leaves too small a gap for this test"
        got = sin_angle(a, ref)
        assert got <= tol, f"layer {name}: sin(angle) {got:.3g} > {tol:.3g}"
        # the test can tell a wrong statistic: the top subspace of one batch alone is far away
        one = batches[:1]
        if method == "activation":
            single = reference_inputs(plain, one)
        else:
            single = captured_gradients(model, one) if low else reference_gradients(plain, one)
        assert sin_angle(top_right_singular(single[name], r)[0], ref) > 100 * tol
        # rows ordered by singular value: row i matches the i-th singular vector up to sign
        cos = (a.double() / a.double().norm(dim=1, keepdim=True) * ref).sum(1).abs()
        assert torch.all(cos > 1 - 10 * tol), cos


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_scale_and_sign(method):
    """A A^T = I / 3, whose mean eigenvalue matches the kaiming init's expected one (1/3)."""
    plain = plain_model()
    model = lorafa_model(plain, torch.float32)
    init_from_data(model, cast(planted_batches(), torch.float32), method, loss_fn=linear_loss)
    for name, layer in lorafa_layers(model):
        a = layer.lora_A.detach().double()
        torch.testing.assert_close(a @ a.T, torch.eye(layer.r, dtype=torch.float64) / 3, atol=1e-6, rtol=0)
        idx = a.abs().argmax(1, keepdim=True)
        assert torch.all(a.gather(1, idx) > 0)  # each row's largest entry is positive
    kaiming = lorafa_ext.LoRAFALinear(nn.Linear(512, 8), r=64, lora_alpha=64).lora_A.double()
    mean_eig = torch.trace(kaiming @ kaiming.T).item() / 64
    assert abs(mean_eig - 1 / 3) < 0.05 / 3  # 32768 entries: the mean is within 1% of 1/3 (10 sigma here)


# ---------------------------------------------------------------------------------- effects on the model


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_output_weights_and_freezing_unchanged(method):
    plain = plain_model()
    model = lorafa_model(plain, torch.float32)
    batches = cast(planted_batches(), torch.float32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batches[0][0]
    with torch.no_grad():
        y0 = model(x)
    trainable = [id(p) for p in lorafa_parameters(model)]
    init_from_data(model, batches, method, loss_fn=linear_loss)
    assert model.training and all(m.training for m in model.modules())  # flags restored
    with torch.no_grad():
        assert torch.equal(model(x), y0)  # B = 0: the adapter adds exactly zero
    after = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in before.items():
        if key.endswith("lora_A"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key  # base weights, biases, B: untouched
    for name, layer in lorafa_layers(model):
        assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert layer.lora_B.grad is None
        # the Gram-inverse cache holds the new A's inverse (refreshed eagerly, not on the next forward)
        a = layer.lora_A.detach().double()
        g = a @ a.T
        inv = torch.linalg.inv(g + layer.eps * torch.trace(g) / layer.r * torch.eye(layer.r, dtype=g.dtype))
        torch.testing.assert_close(layer.lora_gram_inv.double(), inv, rtol=1e-5, atol=1e-5 * inv.abs().max().item())
    assert [id(p) for p in lorafa_parameters(model)] == trainable
    # training afterwards moves B only
    opt = torch.optim.AdamW(lorafa_parameters(model), lr=1e-2)
    linear_loss(model, batches[0]).backward()
    opt.step()
    for key, value in after.items():
        assert torch.equal(model.state_dict()[key], value) != key.endswith("lora_B"), key


def test_grouped_passes_give_the_same_a():
    """max_stat_bytes=1: one pass per layer, the same A as with all statistics in one pass."""
    plain = plain_model()
    batches = cast(planted_batches(), torch.float64)
    calls = {"n": 0}

    def counting_loss(model, batch):
        calls["n"] += 1
        return linear_loss(model, batch)

    one = lorafa_model(plain, torch.float64)
    init_from_data(one, batches, loss_fn=counting_loss)
    assert calls["n"] == len(batches)
    grouped = lorafa_model(plain, torch.float64)
    calls["n"] = 0
    init_from_data(grouped, batches, loss_fn=counting_loss, max_stat_bytes=1)
    assert calls["n"] == 2 * len(batches)
    for name in RANKS:
        assert torch.equal(layer_a(one, name), layer_a(grouped, name))
    # num_batches: the first batches only
    first = lorafa_model(plain, torch.float64)
    init_from_data(first, batches, loss_fn=linear_loss, num_batches=1)
    ref, _ = top_right_singular(reference_gradients(plain, batches[:1])["0"], RANKS["0"])
    assert sin_angle(layer_a(first, "0"), ref) < 1e-8


# ---------------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    plain = plain_model()
    batches = cast(planted_batches(), torch.float64)
    model = lorafa_model(plain, torch.float64)
    a0 = {n: layer_a(model, n).clone() for n in RANKS}
    with pytest.raises(ValueError, match="batches is empty"):
        init_from_data(model, [], loss_fn=linear_loss)
    with pytest.raises(ValueError, match="batches is empty"):
        init_from_data(model, iter([]), loss_fn=linear_loss)
    with pytest.raises(TypeError, match="batches must be an iterable"):
        init_from_data(model, None)
    with pytest.raises(TypeError, match="got a single dict"):
        init_from_data(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="method must be one of"):
        init_from_data(model, batches, "random", loss_fn=linear_loss)
    with pytest.raises(ValueError, match="num_batches must be a positive integer"):
        init_from_data(model, batches, loss_fn=linear_loss, num_batches=0)
    with pytest.raises(ValueError, match="max_stat_bytes must be a positive integer"):
        init_from_data(model, batches, loss_fn=linear_loss, max_stat_bytes=-1)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        init_from_data(model, batches, loss_fn="mse")
    with pytest.raises(TypeError, match="needs loss_fn"):  # tensor batches, no loss_fn, "gradient"
        init_from_data(model, [x for x, _ in batches])
    with pytest.raises(ValueError, match="model has no LoRA-FA layers"):
        init_from_data(plain_model(), batches, loss_fn=linear_loss)
    with pytest.raises(ValueError, match="one-shot iterator"):
        init_from_data(model, iter(batches), loss_fn=linear_loss, max_stat_bytes=1)
    for name in RANKS:  # nothing was written
        assert torch.equal(layer_a(model, name), a0[name])


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_rank_larger_than_the_data_allows(method):
    """2 rows of x: rank 2 < r = 3 for layer '0'. The error names the layer, r and the rank; A is untouched."""
    plain = plain_model()
    x, t = cast(planted_batches(), torch.float64)[0]
    model = lorafa_model(plain, torch.float64)
    a0 = {n: layer_a(model, n).clone() for n in RANKS}
    with pytest.raises(ValueError, match=r"layer '0' has r=3, but its .* has rank 2 .*\(2 rows of x\)"):
        init_from_data(model, [(x[:2], t[:2])], method, loss_fn=linear_loss)
    for name in RANKS:
        assert torch.equal(layer_a(model, name), a0[name])
    # r larger than the dimensions: no data can help
    if method == "activation":  # r >= in_features: LoRAFALinear itself refuses the layer
        with pytest.raises(ValueError, match="r=5 must be smaller than the layer's in_features=4"):
            apply_lorafa(nn.Sequential(nn.Linear(4, 3)).double(), ["0"], r=5, lora_alpha=4)
        return
    wide = nn.Sequential(nn.Linear(6, 3)).double()
    apply_lorafa(wide, ["0"], r=4, lora_alpha=4)
    with pytest.raises(ValueError, match=r"layer '0' has r=4 > min\(in_features, out_features\)=3"):
        init_from_data(wide, [(torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))],
                       method, loss_fn=linear_loss)


def _spectrum_batch(sing, d_in, d_out, seed=0):
    """One fp32 batch whose full-weight gradient under linear_loss is G = t^T x = U^T diag(sing) V, with
    orthonormal rows U (k, out) and V (k, in): G's singular values are exactly ``sing`` (fp64 data)."""
    g = torch.Generator().manual_seed(seed)
    k = len(sing)
    u = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64)).Q.T
    v = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64)).Q.T
    return [((torch.tensor(sing, dtype=torch.float64)[:, None] * v).float(), u.float())], v


def test_gradient_rank_counts_small_singular_values():
    """A real direction at 1e-3 of the largest singular value is above fp32 rounding (a threshold on the
    squared spectrum, G^T G, would drop everything below ~1e-2 here); an exactly missing one is not."""
    layer = nn.Sequential(nn.Linear(48, 40))
    sing = [1.0, 0.5, 3e-3, 2e-3, 1.5e-3, 1e-3]
    batches, v = _spectrum_batch(sing, 48, 40)
    model = copy.deepcopy(layer)
    apply_lorafa(model, ["0"], r=6, lora_alpha=12)
    init_from_data(model, batches, "gradient", loss_fn=linear_loss)
    got = layer_a(model, "0")
    # Wedin: sin <= |rounding of G| / gap, with |rounding| ~ eps * sigma_1 and the gap sigma_6 - 0 = 1e-3
    assert sin_angle(got, v) < 100 * torch.finfo(torch.float32).eps / 1e-3
    planted_rank5, _ = _spectrum_batch(sing[:5], 48, 40)
    model = copy.deepcopy(layer)
    apply_lorafa(model, ["0"], r=6, lora_alpha=12)
    with pytest.raises(ValueError, match=r"layer '0' has r=6, but its full-weight gradient .* has rank 5"):
        init_from_data(model, planted_rank5, "gradient", loss_fn=linear_loss)


def test_trained_or_merged_layers_are_refused():
    plain = plain_model()
    batches = cast(planted_batches(), torch.float64)
    model = lorafa_model(plain, torch.float64)
    with torch.no_grad():
        dict(lorafa_layers(model))["2"].lora_B.add_(0.1)
    with pytest.raises(ValueError, match="layer '2' has a nonzero lora_B"):
        init_from_data(model, batches, loss_fn=linear_loss)
    model = lorafa_model(plain, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dict(lorafa_layers(model))["0"].merge()
    with pytest.raises(ValueError, match="layer '0' is merged"):
        init_from_data(model, batches, loss_fn=linear_loss)


def test_loss_that_ignores_the_model_is_refused():
    model = lorafa_model(plain_model(), torch.float64)
    with pytest.raises(ValueError, match="does not depend on any LoRA-FA layer"):
        init_from_data(model, [torch.ones(3, D_IN, dtype=torch.float64)], loss_fn=lambda m, b: b.sum())


# ---------------------------------------------------------------------------------- PEFT


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _token_batches(n=3, rows=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (rows, length), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_peft_layers_get_the_same_a_as_lorafa_layers(method, tmp_path):
    """from_peft layers (with a rank_pattern) and apply_lorafa layers on the same base model and batches:
    the same A; the dict batches go through the default model(**batch).loss."""
    peft = pytest.importorskip("peft")
    batches = _token_batches()
    targets = ["q_proj", "v_proj", "down_proj"]
    ranks = {"down_proj": 6}
    ours = apply_lorafa(_tiny_llama(), targets, r=4, lora_alpha=8, rank_pattern=ranks)
    init_from_data(ours, batches, method)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks, lora_dropout=0.0)
    peft_model = lorafa_ext.from_peft(peft.get_peft_model(_tiny_llama(), cfg))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        y0 = peft_model(input_ids=ids).logits
    init_from_data(peft_model, batches, method)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, y0)
    peft_layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoRAFALayer)}
    ours_layers = dict(lorafa_layers(ours))
    assert len(peft_layers) == len(ours_layers) == 6
    for name, layer in ours_layers.items():
        peft_a = peft_layers["base_model.model." + name].lora_A["default"].weight
        assert not peft_a.requires_grad
        assert peft_a.shape == layer.lora_A.shape == (6 if name.endswith("down_proj") else 4, layer.in_features)
        assert sin_angle(peft_a.detach(), layer.lora_A.detach()) < 1e-4, name
    # the PeftModel's own save_pretrained carries the new A
    peft_model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path))
    loaded_layers = {n: m for n, m in loaded.named_modules() if n in peft_layers}
    assert len(loaded_layers) == len(peft_layers)
    for name, mod in loaded_layers.items():
        assert torch.equal(mod.lora_A["default"].weight, peft_layers[name].lora_A["default"].weight), name


def test_saved_adapter_reproduces_the_model(tmp_path):
    """save_adapter after init_from_data (and some training of B): PeftModel.from_pretrained on a fresh
    base model has exactly the same A and B, and the same outputs."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    batches = _token_batches()
    model = apply_lorafa(_tiny_llama(), ["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8,
                         rank_pattern={"up_proj": 3})
    init_from_data(model, batches)
    opt = torch.optim.AdamW(lorafa_parameters(model), lr=1e-2)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lorafa_ext.save_adapter(model, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path)).eval()
    state = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    for name, layer in lorafa_layers(model):
        for which, ours in (("A", layer.lora_A), ("B", layer.lora_B)):
            theirs = state[f"base_model.model.{name}.lora_{which}.default.weight"]
            assert torch.equal(theirs, ours.detach()), (name, which)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- torch.distributed

_DIST_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from tests.test_data_init import plain_model, lorafa_model, planted_batches, linear_loss
from lorafa_ext import init_from_data
from lorafa_ext.model import lorafa_layers
out, port, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
try:
    result = {}
    for method in ("gradient", "activation"):
        model = lorafa_model(plain_model(), torch.float64)
        mine = planted_batches()[rank::2]  # rank 0: batches 0 and 2, rank 1: batch 1
        init_from_data(model, mine, method, loss_fn=linear_loss, max_stat_bytes=1)
        result[method] = {n: l.lora_A.detach().clone() for n, l in lorafa_layers(model)}
    torch.save(result, f"{out}/rank{rank}.pt")
finally:
    dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_distributed_ranks_sum_their_statistics(tmp_path):
    """2 gloo ranks, each with part of the batches: both get the same A, that of all the batches."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _DIST_SCRIPT, str(tmp_path), port, str(rank), ROOT],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    for rank, proc in enumerate(procs):
        try:
            text, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} timed out")
        assert proc.returncode == 0, f"rank {rank}:\n{text[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    plain = plain_model()
    batches = planted_batches()
    for method in ("gradient", "activation"):
        single = lorafa_model(plain, torch.float64)
        init_from_data(single, batches, method, loss_fn=linear_loss)
        for name in RANKS:
            assert torch.equal(ranks[0][method][name], ranks[1][method][name])
            assert sin_angle(ranks[0][method][name], layer_a(single, name)) < 1e-8, (method, name)
