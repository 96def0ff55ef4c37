"""Tests for hf_quant.kernels (registry, reference and CPU kernels, custom ops) and QuantLinear's use of them."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_quant.algorithms import quantize_weight
from hf_quant.formats import QuantScheme, decode_params, dequantize
from hf_quant.kernels import available_kernels, select_kernel
from hf_quant.kernels.cpu import CpuInt4PackKernel, CpuInt8PackKernel
from hf_quant.kernels.reference import ReferenceKernel
from hf_quant.nn import QuantLinear

CPU = torch.device("cpu")
IN_FEATURES = 200  # not a multiple of 64 or 128 (short last group), nor of 16
BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _no_forced_kernel(monkeypatch):
    """A HF_QUANT_KERNEL set in the environment would change every selection below."""
    monkeypatch.delenv("HF_QUANT_KERNEL", raising=False)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def scheme_id(s: QuantScheme) -> str:
    fmt = f"int{s.bits}{'-sym' if s.symmetric else ''}" if s.format == "int" else s.format
    return f"{fmt}-g{s.group_size}{'-dq' if s.double_quant else ''}"


def expected_kernel(s: QuantScheme, in_features: int) -> str:
    """Which kernel CPU selection must pick (float32 / bfloat16): written out from the kernels' contracts."""
    g = in_features if s.group_size == -1 else s.group_size
    if s.format == "int" and s.bits <= 4 and g in (32, 64, 128, 256):
        return "cpu_int4pack"
    if s.format == "int" and s.bits == 8 and s.group_size == -1:
        return "cpu_int8pack"
    return "reference"


# (scheme, in_features). method="rtn" throughout: how codes were chosen is irrelevant to the kernels.
CASES = [
    (QuantScheme(bits=b, symmetric=sym, group_size=g, double_quant=dq, method="rtn"), IN_FEATURES)
    for b in (2, 3, 4)
    for sym in (False, True)
    for g in (32, 64, 128)
    for dq in (False, True)
]
CASES += [
    (QuantScheme(bits=8, symmetric=sym, group_size=g, double_quant=dq, method="rtn"), IN_FEATURES)
    for sym in (False, True)
    for g in (-1, 64)
    for dq in (False, True)
]
CASES += [
    (QuantScheme(format="nf4", group_size=64, method="rtn"), IN_FEATURES),
    (QuantScheme(format="nf4", group_size=128, double_quant=True, method="rtn"), IN_FEATURES),
    (QuantScheme(format="fp4", group_size=64, method="rtn"), IN_FEATURES),
    (QuantScheme(format="fp8", bits=8, group_size=128, method="rtn"), IN_FEATURES),
    (QuantScheme(format="fp8", bits=8, group_size=-1, method="rtn"), IN_FEATURES),
    (QuantScheme(bits=5, group_size=64, method="rtn"), IN_FEATURES),
    (QuantScheme(bits=6, symmetric=True, group_size=32, method="rtn"), IN_FEATURES),
    # per-channel 4-bit: the group is the whole row, which the int4 kernel takes when it is 32..256 wide
    (QuantScheme(bits=4, symmetric=True, group_size=-1, method="rtn"), 128),
    (QuantScheme(bits=4, group_size=-1, method="rtn"), IN_FEATURES),
    (QuantScheme(bits=3, group_size=256, method="rtn"), 512),
]


@functools.lru_cache(maxsize=None)
def quantized(scheme: QuantScheme, out_features: int, in_features: int):
    gen = torch.Generator().manual_seed(out_features * 100003 + in_features * 7 + scheme.bits)
    w = torch.randn(out_features, in_features, generator=gen)
    tensors = quantize_weight(w, scheme)
    return tensors, dequantize(scheme, tensors, in_features).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out_features", [40, 97])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{scheme_id(c[0])}-in{c[1]}")
def test_kernels_match_reference(case, out_features, dtype):
    scheme, in_features = case
    shape = (out_features, in_features)
    tensors, w_ref = quantized(scheme, out_features, in_features)
    selected = select_kernel(scheme, shape, CPU, dtype)
    assert selected.name == expected_kernel(scheme, in_features)
    supporting = [k for k in available_kernels().values() if k.unsupported_reason(scheme, shape, CPU, dtype) is None]
    assert ReferenceKernel in supporting and selected in supporting
    assert selected.priority == max(k.priority for k in supporting)
    gen = torch.Generator().manual_seed(out_features + in_features)
    for kernel in supporting:
        state = kernel.prepare(scheme, tensors, shape, dtype)
        for m in (1, 3, 64):
            x = torch.randn(m, in_features, generator=gen).to(dtype)
            y = kernel.linear(x, state)
            assert y.shape == (m, out_features) and y.dtype == dtype, kernel.name
            assert torch.isfinite(y).all(), kernel.name
            ref = x.double() @ w_ref.T  # float64, from the reference dequantization
            bound = BOUNDS[kernel.compute_dtype(dtype)]  # the kernel's declared compute precision
            assert rel_err(y, ref) < bound, (kernel.name, m)
            if m == 3 and kernel is not ReferenceKernel:  # and agrees with the reference kernel itself
                y_ref = ReferenceKernel.linear(x, ReferenceKernel.prepare(scheme, tensors, shape, dtype))
                assert rel_err(y, y_ref) < 2 * bound, kernel.name


def test_registry_contents_and_named_selections():
    kernels = available_kernels()
    assert {"reference", "cpu_int4pack", "cpu_int8pack"} <= set(kernels)
    assert kernels["reference"] is ReferenceKernel
    assert kernels["cpu_int4pack"] is CpuInt4PackKernel and kernels["cpu_int8pack"] is CpuInt8PackKernel
    kernels.clear()  # a copy: the registry itself is not exposed
    assert "reference" in available_kernels()
    pick = lambda s, shape=(64, 256), dtype=torch.float32: select_kernel(s, shape, CPU, dtype).name  # noqa: E731
    assert pick(QuantScheme(bits=4, group_size=128)) == "cpu_int4pack"
    assert pick(QuantScheme(bits=4, group_size=128), dtype=torch.bfloat16) == "cpu_int4pack"
    assert pick(QuantScheme(bits=2, symmetric=True, group_size=32, double_quant=True)) == "cpu_int4pack"
    assert pick(QuantScheme(format="nf4", group_size=64)) == "reference"
    assert pick(QuantScheme(format="fp4", group_size=64)) == "reference"
    assert pick(QuantScheme(format="fp8", bits=8, group_size=128)) == "reference"
    assert pick(QuantScheme(bits=8, group_size=-1)) == "cpu_int8pack"
    assert pick(QuantScheme(bits=8, group_size=-1, symmetric=True)) == "cpu_int8pack"
    assert pick(QuantScheme(bits=8, group_size=128)) == "reference"
    assert pick(QuantScheme(bits=5, group_size=128)) == "reference"
    assert pick(QuantScheme(bits=4, group_size=-1), shape=(64, 4096)) == "reference"  # a 4096-wide group
    assert pick(QuantScheme(bits=4, group_size=-1), shape=(64, 256)) == "cpu_int4pack"
    assert pick(QuantScheme(bits=4, group_size=128), dtype=torch.int8) == "reference"  # not a float dtype
    assert pick(QuantScheme(bits=4, group_size=128)) == QuantLinear(256, 64, False, QuantScheme(bits=4)).kernel_name()
    reason = CpuInt4PackKernel.unsupported_reason(QuantScheme(bits=4), (64, 256), torch.device("meta"), torch.float32)
    assert reason is not None and "CPU" in reason


def test_forced_kernel(monkeypatch):
    nf4 = QuantScheme(format="nf4", group_size=64)
    int4 = QuantScheme(bits=4, group_size=64)
    # Forcing a kernel that cannot run the layer is an error naming it, never a silent fallback.
    monkeypatch.setenv("HF_QUANT_KERNEL", "cpu_int4pack")
    with pytest.raises(ValueError, match="cpu_int4pack"):
        select_kernel(nf4, (64, 256), CPU, torch.float32)
    assert select_kernel(int4, (64, 256), CPU, torch.float32) is CpuInt4PackKernel
    monkeypatch.setenv("HF_QUANT_KERNEL", "cpu_int8pack")
    with pytest.raises(ValueError, match="cpu_int8pack"):
        select_kernel(int4, (64, 256), CPU, torch.float32)
    # Forcing a supported kernel overrides the priority order.
    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    assert select_kernel(int4, (64, 256), CPU, torch.float32) is ReferenceKernel
    monkeypatch.setenv("HF_QUANT_KERNEL", "no_such_kernel")
    with pytest.raises(ValueError, match="no_such_kernel"):
        select_kernel(int4, (64, 256), CPU, torch.float32)
    monkeypatch.delenv("HF_QUANT_KERNEL")
    with pytest.raises(ValueError, match="nope"):
        select_kernel(int4, (64, 256), CPU, torch.float32, prefer="nope")
    with pytest.raises(ValueError, match="cpu_int4pack"):
        select_kernel(nf4, (64, 256), CPU, torch.float32, prefer="cpu_int4pack")
    assert select_kernel(int4, (64, 256), CPU, torch.float32) is CpuInt4PackKernel
    # ... and a module's forward obeys the forced kernel too (error, not fallback).
    q = QuantLinear.from_float(nn.Linear(256, 32), nf4)
    monkeypatch.setenv("HF_QUANT_KERNEL", "cpu_int4pack")
    with pytest.raises(ValueError, match="cpu_int4pack"):
        q(torch.randn(2, 256))


# --------------------------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------------------------

LINEAR_SCHEMES = [
    QuantScheme(bits=4, group_size=64),  # cpu_int4pack, short last group
    QuantScheme(bits=3, symmetric=True, group_size=32, double_quant=True),  # cpu_int4pack, 3-bit
    QuantScheme(bits=8, group_size=-1),  # cpu_int8pack, asymmetric
    QuantScheme(format="nf4", group_size=64),  # reference
]


def compute_bound(scheme: QuantScheme, dtype: torch.dtype, shape=(97, 200)) -> float:
    """Error bound for a QuantLinear forward in `dtype`: that of the precision the selected kernel computes in
    (the fused CPU kernels compute float32 inputs in bfloat16, their declared precision)."""
    return BOUNDS[select_kernel(scheme, shape, CPU, dtype).compute_dtype(dtype)]


def fresh_output(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The forward of q's current packed tensors through a freshly prepared kernel state (no module cache)."""
    shape = (q.out_features, q.in_features)
    kernel = select_kernel(q.scheme, shape, x.device, x.dtype)
    y = kernel.linear(x, kernel.prepare(q.scheme, q.packed_tensors(), shape, x.dtype))
    return y + q.bias.to(y.dtype)


def make_linear(in_features=200, out_features=97, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quant_linear_forward(scheme, dtype):
    layer = make_linear()
    q = QuantLinear.from_float(layer, scheme)
    assert (q.in_features, q.out_features) == (200, 97)
    assert q.kernel_name(dtype=dtype) == expected_kernel(scheme, 200)
    assert torch.equal(q.bias, layer.bias)
    w = q.dequantize_weight()
    assert w.shape == layer.weight.shape
    # sanity: this is the quantized weight of the layer, not something else
    assert rel_err(w, layer.weight) < 0.15
    gen = torch.Generator().manual_seed(1)
    for lead in ((5, 7), (1,), ()):
        x = torch.randn(*lead, 200, generator=gen).to(dtype)
        y = q(x)
        assert y.shape == (*lead, 97) and y.dtype == dtype
        ref = F.linear(x.double(), w.double(), q.bias.double())
        assert rel_err(y, ref) < compute_bound(scheme, dtype), lead
    # no bias
    qn = QuantLinear.from_float(make_linear(bias=False), scheme)
    assert qn.bias is None
    x = torch.randn(3, 200, generator=gen)
    bound = compute_bound(scheme, torch.float32)
    assert rel_err(qn(x), F.linear(x.double(), qn.dequantize_weight().double())) < bound


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES, ids=scheme_id)
def test_quant_linear_dtype_casts_keep_packed_buffers(scheme):
    q = QuantLinear.from_float(make_linear(), scheme)
    x = torch.randn(4, 200)
    y32 = q(x)
    before = {name: t.clone() for name, t in q.packed_tensors().items()}
    dtypes = {name: t.dtype for name, t in before.items()}
    assert dtypes["qweight"] == torch.uint8
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.float(), torch.float32), (lambda m: m.to(dtype=torch.float64), torch.float64)):
        assert cast(q) is q
        assert q.bias.dtype == dtype  # the bias follows float casts ...
        for name, t in q.packed_tensors().items():  # ... the packed tensors do not, and keep their exact values
            assert t.dtype == dtypes[name], name
            assert torch.equal(t, before[name]), name
    q.to(torch.bfloat16)
    y16 = q(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y32) < 2e-2
    q.float()  # back to float32: same packed tensors, so the same output up to the bias' rounding on the way
    bound = compute_bound(scheme, torch.float32)
    assert rel_err(q(x), F.linear(x.double(), q.dequantize_weight().double(), q.bias.double())) < bound
    assert rel_err(q(x), y32) < 1e-2


def test_quant_linear_kernel_cache_follows_buffers():
    scheme = QuantScheme(bits=4, group_size=64)
    q = QuantLinear.from_float(make_linear(seed=0), scheme)
    other = make_linear(seed=1)
    x = torch.randn(3, 200)
    y0 = q(x)
    new = quantize_weight(other.weight.detach(), scheme)
    w_new = dequantize(scheme, new, 200).double()
    expect = F.linear(x.double(), w_new, q.bias.double())
    assert rel_err(y0, expect) > 0.5  # the two weights really differ
    # The fused kernel computes in bfloat16 (declared precision): a stale cache would be off by > 0.5, so check
    # the cached forward is bit-identical to a freshly prepared state of the new buffers, and near the float64 math.
    assert q.kernel_name() == "cpu_int4pack"
    bound = compute_bound(scheme, torch.float32)

    def check(module):
        y = module(x)
        assert torch.equal(y, fresh_output(module, x))
        assert rel_err(y, expect) < bound

    # load_packed replaces every buffer: the next forward uses the new weight
    q.load_packed(new)
    check(q)
    # reassigning the buffers as attributes (as state-dict loading does) is picked up too
    q2 = QuantLinear.from_float(make_linear(seed=0), scheme)
    q2(x)
    for name, t in new.items():
        setattr(q2, name, t.clone())
    check(q2)
    # so is an in-place copy into the existing buffers
    q3 = QuantLinear.from_float(make_linear(seed=0), scheme)
    q3(x)
    with torch.no_grad():
        for name, t in new.items():
            getattr(q3, name).copy_(t)
    check(q3)
    # and load_packed validates what it is given
    with pytest.raises(ValueError):
        q.load_packed({k: v for k, v in new.items() if k != "zeros"})
    with pytest.raises(ValueError):
        q.load_packed({**new, "scales": new["scales"].float()})


def test_quant_linear_kernel_cache_follows_scales_alone():
    scheme = QuantScheme(bits=4, group_size=64)
    q = QuantLinear.from_float(make_linear(), scheme)
    x = torch.randn(3, 200)
    y0 = q(x)
    q.scales = q.scales * 2
    expect = F.linear(x.double(), q.dequantize_weight().double(), q.bias.double())
    assert rel_err(y0, expect) > 0.3  # a stale cache would be far off
    # bit-identical to a fresh state of the edited buffers; near the float64 math at the kernel's precision
    y = q(x)
    assert torch.equal(y, fresh_output(q, x))
    assert rel_err(y, expect) < compute_bound(scheme, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Custom ops: opcheck, fake implementations, torch.compile
# --------------------------------------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def dequantize_args(scheme: QuantScheme, shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(sum(shape))
    tensors = quantize_weight(torch.randn(shape, generator=gen), scheme)
    scale, zero = decode_params(scheme, tensors)
    table = scheme.codec.table()
    return tensors, (tensors["qweight"], scale, zero, table, scheme.bits, scheme.group_size, shape[-1], dtype)


DEQUANT_CASES = [
    (QuantScheme(bits=3, group_size=64, method="rtn"), (40, 200), torch.float32),
    (QuantScheme(bits=4, symmetric=True, group_size=-1, method="rtn"), (3, 16, 96), torch.bfloat16),
    (QuantScheme(format="nf4", group_size=32, method="rtn"), (24, 72), torch.float16),
    (QuantScheme(format="fp8", bits=8, group_size=128, method="rtn"), (2, 8, 130), torch.float32),
]


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=lambda c: scheme_id(c[0]) if isinstance(c, tuple) else None)
def test_dequantize_op(case):
    scheme, shape, dtype = case
    tensors, args = dequantize_args(scheme, shape, dtype)
    op = torch.ops.hf_quant.dequantize.default
    out = op(*args)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, dequantize(scheme, tensors, shape[-1], dtype))  # the op is the reference decoding
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = op(*fake_args)
    assert fake.shape == shape and fake.dtype == dtype and fake.device == out.device


def dense_strides(t: torch.Tensor) -> tuple:
    """Strides of the dimensions that have more than one element (the others' strides carry no meaning)."""
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)


def int4_state(out_features=40, in_features=200, dtype=torch.float32):
    scheme = QuantScheme(bits=4, group_size=64, method="rtn")
    tensors, _ = quantized(scheme, out_features, in_features)
    return CpuInt4PackKernel.prepare(scheme, tensors, (out_features, in_features), dtype)


def int8_state(asymmetric: bool, out_features=40, in_features=200, dtype=torch.float32):
    scheme = QuantScheme(bits=8, group_size=-1, symmetric=not asymmetric, method="rtn")
    tensors, _ = quantized(scheme, out_features, in_features)
    return CpuInt8PackKernel.prepare(scheme, tensors, (out_features, in_features), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out_features", [40, 48])  # 40: padded to the 16-row tile and cropped
def test_int4pack_linear_op(out_features, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    st = int4_state(out_features, dtype=dtype)
    compute = CpuInt4PackKernel.compute_dtype(dtype)  # the op takes the dtype the kernel computes in
    assert st["scale_zeros"].dtype == compute
    op = torch.ops.hf_quant.int4pack_linear.default
    for m in (1, 5):
        x = torch.randn(m, st["in_padded"]).to(compute)
        args = (x, st["packed"], st["scale_zeros"], st["group_size"], st["out_features"])
        y = op(*args)
        assert y.shape == (m, out_features) and y.dtype == compute and y.is_contiguous()
        assert torch.equal(CpuInt4PackKernel.linear(x.to(dtype), st), y.to(dtype))  # the kernel's forward is the op
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert fake.shape == y.shape and fake.dtype == y.dtype and dense_strides(fake) == dense_strides(y)


@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8pack_linear_op(asymmetric, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    st = int8_state(asymmetric, dtype=dtype)
    assert (st["zero_term"] is not None) == asymmetric
    compute = CpuInt8PackKernel.compute_dtype(dtype)  # the op takes the dtype the kernel computes in
    assert st["scale"].dtype == compute
    op = torch.ops.hf_quant.int8pack_linear.default
    for m in (1, 5):
        x = torch.randn(m, st["in_padded"]).to(compute)
        args = (x, st["weight"], st["scale"], st["zero_term"])
        y = op(*args)
        assert y.shape == (m, 40) and y.dtype == compute
        assert torch.equal(CpuInt8PackKernel.linear(x.to(dtype), st), y.to(dtype))  # the kernel's forward is the op
        torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert fake.shape == y.shape and fake.dtype == y.dtype and dense_strides(fake) == dense_strides(y)


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES, ids=scheme_id)
def test_torch_compile_matches_eager(scheme):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    # backend="aot_eager": dynamo + AOTAutograd trace the custom ops through their fake implementations, exactly
    # what inductor would consume, without inductor's C++ compile (~45 s cold on 2 cores).
    q = QuantLinear.from_float(make_linear(), scheme)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=False, backend="aot_eager")
    gen = torch.Generator().manual_seed(2)
    for lead in ((3,), (2, 5)):
        x = torch.randn(*lead, 200, generator=gen)
        with torch.no_grad():
            eager = q(x)
            out = compiled(x)
        assert out.shape == eager.shape
        assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_quant_linear_forward_under_inference_mode():
    """Modules built and run under torch.inference_mode (no version counters) still cache and compute."""
    with torch.inference_mode():
        lin = torch.nn.Linear(128, 48)
        q = QuantLinear.from_float(lin, QuantScheme(bits=4, group_size=64))
        x = torch.randn(2, 128)
        y = q(x)
        ref = F.linear(x.double(), q.dequantize_weight().double(), q.bias.double())
        assert rel_err(y, ref) < compute_bound(q.scheme, torch.float32)
        assert torch.equal(q(x), y)
