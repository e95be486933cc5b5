"""QLoRA-FA: LoRA-FA adapters over quantized base layers (bitsandbytes 4-bit NF4 / FP4 and 8-bit,
torchao int8 weight-only), on the CPU: forward and backward against PEFT's LoRA on the same quantized
layer with A frozen, what the adapter branch saves, conversion errors, and adapters saved and loaded
with PEFT."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorafa_ext
from lorafa_ext import LoRAFALinear, apply_lorafa, from_peft, save_adapter
from lorafa_ext.modules.quantized import quantization_of

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

# PEFT's torchao layer warns that merge() needs a transformers TorchAoConfig; merging is not tested here.
pytestmark = pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated:UserWarning")

# bitsandbytes' CPU inference path repacks 4-bit weights in blocks of 32 rows and 64 columns.
IN, HIDDEN, OUT = 64, 64, 32
QUANTS = ["nf4", "fp4", "int8"]


def _bnb_layer(linear: nn.Linear, quant: str) -> nn.Module:
    """The bitsandbytes quantized copy of ``linear`` (on the CPU, fp32 compute)."""
    w = linear.weight.detach().clone()
    if quant == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, OUT, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _quantized_model(quant: str, seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    model = TinyMLP()
    if quant == "torchao-int8":
        torchao = pytest.importorskip("torchao.quantization")
        torchao.quantize_(model, torchao.Int8WeightOnlyConfig())
    else:
        model.up, model.down = _bnb_layer(model.up, quant), _bnb_layer(model.down, quant)
        # what transformers sets on a bitsandbytes-quantized model: PEFT then builds its bnb LoRA layers
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = quant != "int8", quant == "int8"
    return model


def _x(seed=1):
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


def _peft_model(quant, dropout=0.0):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"],
                             init_lora_weights=False)  # random, nonzero B
    model = peft.get_peft_model(_quantized_model(quant), config)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    return model


def _step(model, x):
    """y, dx and every B gradient of one forward and backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("quant", QUANTS + ["torchao-int8"])
def test_from_peft_matches_peft_lora_with_a_frozen(quant):
    model = _peft_model(quant)
    y_ref, dx_ref, g_ref = _step(model, _x())
    from_peft(model, correction=False)
    switched = [m for m in model.modules() if isinstance(m, lorafa_ext.modules.base.LoRAFALayer)]
    assert len(switched) == 2 and all(quantization_of(m.get_base_layer()) for m in switched)
    peft_class = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}.get(quant, "TorchaoLoraLinear")
    assert all(type(m).__name__ == f"LoRAFAPeft{peft_class}" for m in switched)
    y, dx, grads = _step(model, _x())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == g_ref.keys() and len(grads) == 2
    for name in grads:
        torch.testing.assert_close(grads[name], g_ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", QUANTS + ["torchao-int8"])
def test_lorafa_linear_over_quantized_base(quant):
    """base_layer(x) + s (x A^T) B^T, with gradients for x and B only."""
    model = apply_lorafa(_quantized_model(quant), ["up", "down"], r=4, lora_alpha=8, correction=False)
    layer = model.up
    assert isinstance(layer, LoRAFALinear) and quantization_of(layer.base_layer) is not None
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = _x().detach().requires_grad_(True)
    y = layer(x)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    (dx_ref,) = torch.autograd.grad(expected, x, dy)
    torch.testing.assert_close(x.grad, dx_ref, rtol=1e-5, atol=1e-5)
    db_ref = layer.scaling * dy.reshape(-1, HIDDEN).t() @ (x.detach().reshape(-1, IN) @ layer.lora_A.t())
    torch.testing.assert_close(layer.lora_B.grad, db_ref, rtol=1e-5, atol=1e-5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["up.lora_B", "down.lora_B"]
    with pytest.raises(NotImplementedError, match="quantized"):
        layer.merge()


@pytest.mark.parametrize("quant", QUANTS)
def test_adapter_branch_saves_only_z(quant):
    """With dropout on, the layer saves what its base layer saves plus z (N x r) (and the Gram
    inverse for the correction): no copy of x, no dropout mask."""
    layer = LoRAFALinear(_quantized_model(quant).up, r=4, lora_alpha=8, lora_dropout=0.25, correction=True)
    x = _x().requires_grad_(True)

    def saved_shapes(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x)
        return saved

    base = saved_shapes(layer.base_layer)
    ours = saved_shapes(layer)
    extra = [tuple(t.shape) for t in ours]
    for t in base:
        extra.remove(tuple(t.shape))
    params = {tuple(p.shape) for p in (layer.lora_A, layer.lora_B)}
    extra = [s for s in extra if s not in params and s != ()]  # A, B and the dropout seed
    assert sorted(extra) == [(4, 4), (15, 4)], extra
    assert not any(t.dtype == torch.bool for t in ours)


def test_from_peft_refuses_before_switching_any():
    """An unswitchable LoRA layer (an Embedding) is an error at conversion, with no layer changed."""

    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, IN)
            self.up = _bnb_layer(nn.Linear(IN, HIDDEN), "nf4")

        def forward(self, ids):
            return self.up(self.emb(ids))

    model = peft.get_peft_model(WithEmbedding(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "up"]))
    classes = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=r"1 LoRA layers cannot run as LoRA-FA .*emb \(Embedding\)"):
        from_peft(model)
    assert [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_save_adapter_loads_in_peft(tmp_path, quant):
    """An adapter trained over a quantized base loads in PEFT over the same quantized base, with the
    same outputs."""
    ours = apply_lorafa(_quantized_model(quant), ["up", "down"], r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = _x()
    ours.eval()  # as from_pretrained leaves the PEFT model (bitsandbytes' CPU eval path differs from train's)
    with torch.no_grad():
        y_ours = ours(x)
    save_adapter(ours, str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(_quantized_model(quant), str(tmp_path))
    with torch.no_grad():
        y_peft = loaded(x)
    torch.testing.assert_close(y_peft, y_ours, rtol=1e-5, atol=1e-5)
    # and back: the PEFT model switched to LoRA-FA gives the same outputs again
    from_peft(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y_ours, rtol=1e-5, atol=1e-5)


def test_switched_class_pickles_by_name():
    model = _peft_model("nf4")
    from_peft(model)
    cls = type(model.base_model.model.up)
    assert cls.__name__ == "LoRAFAPeftLinear4bit"
    from lorafa_ext.integrations import peft as integration

    assert getattr(integration, cls.__name__) is cls
    assert copy.deepcopy(cls) is cls


@pytest.mark.parametrize("quant", ["nf4", "torchao-int8"])
def test_compile_fullgraph_matches_eager(quant):
    torch._dynamo.reset()
    model = apply_lorafa(_quantized_model(quant), ["up", "down"], r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    eager = _step(model, _x())
    compiled = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), _x())
    for a, b in zip(eager[:2], compiled[:2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in eager[2]:
        torch.testing.assert_close(compiled[2][name], eager[2][name], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_from_peft_lora_linear_over_bitsandbytes_layer():
    """A model not marked as loaded in 4 bit gets PEFT's plain lora.Linear over the bitsandbytes
    layer: it switches to LoRAFAPeftLinear and runs the quantized base forward."""
    model = _quantized_model("nf4")
    del model.is_loaded_in_4bit, model.is_loaded_in_8bit
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    y_ref, dx_ref, g_ref = _step(model, _x())
    from_peft(model, correction=False)
    assert type(model.base_model.model.up).__name__ == "LoRAFAPeftLinear"
    y, dx, grads = _step(model, _x())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], rtol=1e-5, atol=1e-5)
