"""The fused kernels against their PyTorch references computed in float64.

On a CPU machine the Triton code runs in Triton's interpreter (TRITON_INTERPRET=1, set below before
any kernel is jitted: `kernels` jits on first launch), on small shapes; on a GPU the same tests run
the compiled kernels, and the tests marked gpu add bf16 runs at LLM-like shapes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from autotune import kernels  # noqa: E402
from autotune.engine.config import ModelConfig  # noqa: E402
from autotune.engine.model import build_model  # noqa: E402

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
MODULES = {name: sys.modules[f"autotune.kernels.{name}"] for name in ("rms_norm", "layer_norm", "linear_cross_entropy")}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def run(fn, args, differentiable, upstream=None):
    """Outputs and gradients of fn(*args) for the upstream gradients (random ones when None)."""
    leaves = [a.detach().clone().requires_grad_(d) if d else a for a, d in zip(args, differentiable)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if upstream is None:
        gen = torch.Generator().manual_seed(1)
        upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    sum((o.double() * u).sum() for o, u in zip(outs, upstream)).backward()
    grads = [leaf.grad for leaf, d in zip(leaves, differentiable) if d]
    return [o.detach() for o in outs], grads, upstream


def check_against_float64(triton_fn, ref_fn, args, differentiable, dtype):
    ref_args = [a.double() if a.is_floating_point() else a for a in args]
    ref_outs, ref_grads, upstream = run(ref_fn, ref_args, differentiable)
    outs, grads, _ = run(triton_fn, args, differentiable, upstream)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == dtype or out.dtype == torch.float32  # the loss is fp32
        assert rel_err(out, ref) < TOL[dtype], ("forward", rel_err(out, ref))
    for grad, ref, arg in zip(grads, ref_grads, [a for a, d in zip(args, differentiable) if d]):
        assert grad.dtype == arg.dtype
        assert rel_err(grad, ref) < TOL[dtype], ("backward", rel_err(grad, ref))


def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=DEVICE, dtype=dtype)


# --- forward and backward against float64 -------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]
# rows x dim: dim not a power of two; one row; rows longer than one block (max_block smaller than dim)
NORM_SHAPES = [((3, 5, 96), 16384), ((1, 7), 16384), ((4, 100), 32)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,max_block", NORM_SHAPES)
def test_rms_norm(dtype, shape, max_block, monkeypatch):
    monkeypatch.setattr(MODULES["rms_norm"], "MAX_BLOCK", max_block)
    x, w = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, scale=0.1, shift=1.0, seed=1)
    check_against_float64(lambda x, w: kernels.rms_norm(x, w, 1e-5, impl="triton"),
                          lambda x, w: kernels.rms_norm_torch(x, w, 1e-5), [x, w], [True, True], dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,max_block", NORM_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(dtype, shape, max_block, with_bias, monkeypatch):
    monkeypatch.setattr(MODULES["layer_norm"], "MAX_BLOCK", max_block)
    args = [randn(*shape, dtype=dtype, shift=3.0), randn(shape[-1], dtype=dtype, scale=0.1, shift=1.0, seed=1)]
    if with_bias:
        args.append(randn(shape[-1], dtype=dtype, seed=2))
    check_against_float64(lambda x, w, b=None: kernels.layer_norm(x, w, b, 1e-5, impl="triton"),
                          lambda x, w, b=None: kernels.layer_norm_torch(x, w, b, 1e-5),
                          args, [True] * len(args), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 100), (1, 1), (3, 1500)])  # the last spans two programs
def test_swiglu(dtype, shape):
    args = [randn(*shape, dtype=dtype, scale=2.0), randn(*shape, dtype=dtype, seed=1)]
    check_against_float64(lambda g, u: kernels.swiglu(g, u, impl="triton"), kernels.swiglu_torch,
                          args, [True, True], dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,heads,kv_heads,head_dim", [(2, 3, 4, 2, 24), (1, 1, 3, 3, 8), (1, 2, 2, 1, 6)])
def test_apply_rope(dtype, b, s, heads, kv_heads, head_dim):
    from autotune.engine.model import apply_rope as engine_rope, rope_tables

    cos, sin = (t[:s].to(DEVICE) for t in rope_tables(head_dim, 16, 10000.0))
    q, k = randn(b, s, heads, head_dim, dtype=dtype), randn(b, s, kv_heads, head_dim, dtype=dtype, seed=1)
    check_against_float64(lambda q, k, c, s: kernels.apply_rope(q, k, c, s, impl="triton"), kernels.apply_rope_torch,
                          [q, k, cos, sin], [True, True, False, False], dtype)
    for ours, engine in zip(kernels.apply_rope(q, k, cos, sin, impl="triton"), engine_rope(q, k, cos, sin)):
        torch.testing.assert_close(ours, engine)  # the same rotation as the engine's own (halves layout)


# tokens, hidden, vocab, max block over the vocab, fraction of ignored targets
CE_CASES = [
    (13, 16, 300, 128, 0.3),  # vocab not a multiple of the block, tokens not a multiple of the chunk
    (1, 16, 100, 4096, 0.0),  # a single token, the whole vocabulary in one block
    (6, 8, 50, 4096, 1.0),  # every target ignored
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,vocab,max_block,ignored", CE_CASES)
def test_linear_cross_entropy(dtype, tokens, hidden, vocab, max_block, ignored, monkeypatch):
    module = MODULES["linear_cross_entropy"]
    monkeypatch.setattr(module, "MAX_BLOCK_V", max_block)
    assert tokens <= 1 or module.chunk_rows(tokens, vocab, hidden) < tokens  # several chunks
    gen = torch.Generator().manual_seed(3)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[torch.rand(tokens, generator=gen) < ignored] = -100
    h, w = randn(tokens, hidden, dtype=dtype), randn(vocab, hidden, dtype=dtype, scale=0.3, seed=1)
    args = [h, w, targets.to(DEVICE)]
    fn = lambda h, w, t: kernels.linear_cross_entropy(h, w, t, impl="triton")  # noqa: E731
    if ignored == 1.0:  # loss 0 and zero gradients, not NaN; the reference agrees
        outs, grads, _ = run(fn, args, [True, True, False])
        ref_outs, _, _ = run(kernels.linear_cross_entropy_torch, args, [True, True, False])
        assert outs[0].item() == 0.0 and ref_outs[0].item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        return
    check_against_float64(fn, kernels.linear_cross_entropy_torch, args, [True, True, False], dtype)


@needs_triton
def test_linear_cross_entropy_leading_dims_and_autocast():
    """[b, s, h] hidden with [b, s] targets; under autocast the matmuls run in bf16, grads come back in fp32."""
    h, w = randn(2, 3, 16), randn(40, 16, scale=0.3, seed=1)
    targets = torch.tensor([[1, 2, -100], [39, 0, 5]], device=DEVICE)
    ref, ref_grads, upstream = run(kernels.linear_cross_entropy_torch, [h.double(), w.double(), targets],
                                   [True, True, False])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grads, _ = run(lambda h, w, t: kernels.linear_cross_entropy(h, w, t, impl="triton"), [h, w, targets],
                            [True, True, False], upstream)
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    assert rel_err(out[0], ref[0]) < 1e-2
    assert all(rel_err(g, r) < 2e-2 for g, r in zip(grads, ref_grads))


@needs_triton
def test_linear_cross_entropy_backward_runs_once():
    h = randn(4, 8).requires_grad_()
    loss = kernels.linear_cross_entropy(h, randn(20, 8, seed=1), torch.arange(4, device=DEVICE), impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@needs_triton
def test_linear_cross_entropy_under_no_grad_makes_only_the_loss(monkeypatch):
    module, launches = MODULES["linear_cross_entropy"], []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["WRITE_GRAD"])
                return kernel[grid](*args, **kwargs)
            return launch

    kernel = module._kernel
    monkeypatch.setattr(module, "_kernel", Recorder())
    h, w, t = randn(5, 8).requires_grad_(), randn(20, 8, seed=1).requires_grad_(), torch.arange(5, device=DEVICE)
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h, w, t, impl="triton")
    assert launches and not any(launches)  # no gradient of the logits was written
    assert rel_err(loss, kernels.linear_cross_entropy_torch(h.double(), w.double(), t)) < 1e-5
    kernels.linear_cross_entropy(h, w, t, impl="triton").backward()
    assert launches[-1] and h.grad is not None


# --- what is saved for backward ------------------------------------------------------------------

@needs_triton
def test_saved_for_backward_matches_the_hooks():
    """SAVED_FOR_BACKWARD counts exactly the non-parameter tensors that saved-tensor hooks see."""
    def saved_bytes(fn, *params):
        skip = {p.data_ptr() for p in params}
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(0 if t.data_ptr() in skip else t.numel() * t.element_size()) or t,
                lambda t: t):
            fn()
        return sum(sizes)

    bf16, rows, dim = torch.bfloat16, 6, 40
    x = randn(rows, dim, dtype=bf16).requires_grad_()
    w, b = randn(dim, dtype=bf16, seed=1).requires_grad_(), randn(dim, dtype=bf16, seed=2).requires_grad_()
    table = kernels.SAVED_FOR_BACKWARD
    assert saved_bytes(lambda: kernels.rms_norm(x, w, 1e-5, impl="triton"), w) == table["rms_norm"](rows, dim, 2)
    assert (saved_bytes(lambda: kernels.layer_norm(x, w, b, 1e-5, impl="triton"), w, b)
            == table["layer_norm"](rows, dim, 2))
    assert saved_bytes(lambda: kernels.swiglu(x, x * 2, impl="triton")) == table["swiglu"](rows * dim, 2)
    q, k = randn(1, 2, 4, 8, dtype=bf16).requires_grad_(), randn(1, 2, 2, 8, dtype=bf16).requires_grad_()
    cos, sin = torch.ones(2, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE)
    assert saved_bytes(lambda: kernels.apply_rope(q, k, cos, sin, impl="triton"), cos, sin) == table["apply_rope"]()
    head = randn(30, dim, dtype=bf16, seed=3).requires_grad_()
    targets = torch.arange(rows, device=DEVICE)
    assert (saved_bytes(lambda: kernels.linear_cross_entropy(x, head, targets, impl="triton"))
            == table["linear_cross_entropy"](rows, dim, 30, 2))


# --- the engine model with kernels=triton -------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_with_triton_kernels_trains_like_torch(family):
    cfg = ModelConfig(family=family, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2 if family == "llama" else None,
                      d_ff=48, vocab_size=64, max_seq_len=16, tie_embeddings=family == "gpt2")
    losses = {}
    for choice in ("torch", "triton"):
        model = build_model(cfg, device=DEVICE, seed=0, kernels=choice)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        losses[choice] = []
        for _ in range(3):  # one batch, seen again: the loss must fall
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[choice].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]  # it learns
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=0)


@needs_triton
@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (2, "bf16")])
def test_engine_runs_plan_kernels_triton(zero_stage, precision):
    """plan.kernels=triton through the engine (DDP/FSDP2, autocast/mixed precision) trains as torch does."""
    from autotune.engine import dist
    from autotune.engine.config import build_train_config
    from autotune.engine.train import Engine, reduce_loss

    dist.init_distributed()
    try:
        losses = {}
        for choice in ("torch", "triton"):
            cfg = build_train_config({
                "model": dict(family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                              vocab_size=64, max_seq_len=16),
                "job": dict(seq_len=8, global_batch=2, steps=3),
                "plan": dict(zero_stage=zero_stage, precision=precision, micro_batch=2, kernels=choice),
            })
            engine = Engine(cfg, dist.device_for_rank())
            losses[choice] = [reduce_loss(engine.step(step).loss)[0] for step in range(3)]
    finally:
        dist.shutdown()
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=tol, atol=0)


# --- choosing the implementation, and bad input ------------------------------------------------

def test_auto_and_torch_run_the_reference_on_cpu():
    x, w = torch.randn(3, 8), torch.randn(8)
    expected = kernels.rms_norm_torch(x, w, 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, w, impl="auto"), expected)
    torch.testing.assert_close(kernels.rms_norm(x, w, impl="torch"), expected)
    torch.testing.assert_close(expected, torch.nn.functional.rms_norm(x, (8,), w, 1e-6))
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.rms_norm(x, w, impl="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="about CPU tensors")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.swiglu(torch.randn(4), torch.randn(4), impl="triton")


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys.modules["autotune.kernels._common"], "triton", None)
    x = torch.randn(2, 4, device=DEVICE)
    torch.testing.assert_close(kernels.swiglu(x, x, impl="auto"), kernels.swiglu_torch(x, x))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        kernels.swiglu(x, x, impl="triton")


def _bad_inputs():
    f32, d = torch.float32, DEVICE
    x, w = torch.randn(4, 8, device=d), torch.randn(8, device=d)
    q, k = torch.randn(1, 3, 2, 8, device=d), torch.randn(1, 3, 1, 8, device=d)
    cos, sin = torch.randn(3, 4, device=d), torch.randn(3, 4, device=d)
    h, head, t = torch.randn(5, 8, device=d), torch.randn(11, 8, device=d), torch.zeros(5, dtype=torch.long, device=d)
    return [
        ("weight must have shape", ValueError, lambda: kernels.rms_norm(x, torch.randn(7, device=d))),
        ("weight must have shape", ValueError, lambda: kernels.rms_norm(x, torch.randn(1, device=d), impl="torch")),
        ("x must be float32", TypeError, lambda: kernels.rms_norm(x.long(), w)),
        ("need contiguous", ValueError, lambda: kernels.rms_norm(torch.randn(8, 4, device=d).T, w, impl="triton")),
        ("bias must have shape", ValueError, lambda: kernels.layer_norm(x, w, torch.randn(9, device=d))),
        ("one shape", ValueError, lambda: kernels.swiglu(x, x[:, :4])),
        ("one dtype", TypeError, lambda: kernels.swiglu(x, x.to(torch.bfloat16))),
        ("need contiguous", ValueError, lambda: kernels.swiglu(x.T, x.T, impl="triton")),
        ("cos must be float32", TypeError, lambda: kernels.apply_rope(q, k, cos.long(), sin)),
        ("sin must have shape", ValueError, lambda: kernels.apply_rope(q, k, cos, sin[:2])),
        ("must share batch", ValueError, lambda: kernels.apply_rope(q, k[:, :2], cos, sin)),
        ("head_dim must be even", ValueError, lambda: kernels.apply_rope(q[..., :7], k[..., :7], cos, sin)),
        ("need contiguous", ValueError,
         lambda: kernels.apply_rope(q.transpose(1, 2).contiguous().transpose(1, 2), k, cos, sin, impl="triton")),
        ("weight must be \\[vocab, 8\\]", ValueError, lambda: kernels.linear_cross_entropy(h, head.T, t)),
        ("one dtype", TypeError, lambda: kernels.linear_cross_entropy(h, head.to(torch.bfloat16), t)),
        ("targets must be int64", TypeError, lambda: kernels.linear_cross_entropy(h, head, t.to(f32))),
        ("targets must have shape", ValueError, lambda: kernels.linear_cross_entropy(h, head, t[:4])),
        ("outside \\[0, 11\\)", ValueError, lambda: kernels.linear_cross_entropy(h, head, t + 11, impl="torch")),
        ("outside \\[0, 11\\)", ValueError, lambda: kernels.linear_cross_entropy(h, head, t - 5)),
    ]


@needs_triton
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_input_is_a_clear_error(case):
    message, error, call = _bad_inputs()[case]
    with pytest.raises(error, match=message):
        call()


def test_benchmark_script_imports_and_explains_itself_on_cpu():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_kernels.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "Liger" in done.stdout


# --- compiled kernels on a GPU, bf16, at LLM-like shapes ---------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "swiglu", "apply_rope", "linear_cross_entropy"])
def test_compiled_kernels_bf16_on_gpu(op):
    bf16 = torch.bfloat16
    if op == "rms_norm":
        x, w = randn(4096, 4096, dtype=bf16), randn(4096, dtype=bf16, scale=0.1, shift=1.0, seed=1)
        check_against_float64(lambda x, w: kernels.rms_norm(x, w, 1e-5), lambda x, w: kernels.rms_norm_torch(x, w, 1e-5),
                              [x, w], [True, True], bf16)
    elif op == "layer_norm":
        args = [randn(4096, 3000, dtype=bf16, shift=2.0), randn(3000, dtype=bf16, shift=1.0, seed=1),
                randn(3000, dtype=bf16, seed=2)]
        check_against_float64(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
                              lambda x, w, b: kernels.layer_norm_torch(x, w, b, 1e-5), args, [True] * 3, bf16)
    elif op == "swiglu":
        args = [randn(4096, 11008, dtype=bf16, scale=2.0), randn(4096, 11008, dtype=bf16, seed=1)]
        check_against_float64(kernels.swiglu, kernels.swiglu_torch, args, [True, True], bf16)
    elif op == "apply_rope":
        from autotune.engine.model import rope_tables

        cos, sin = (t.to(DEVICE) for t in rope_tables(128, 1024, 500000.0))
        args = [randn(2, 1024, 32, 128, dtype=bf16), randn(2, 1024, 8, 128, dtype=bf16, seed=1), cos, sin]
        check_against_float64(kernels.apply_rope, kernels.apply_rope_torch, args, [True, True, False, False], bf16)
    else:
        tokens, hidden, vocab = 8192, 512, 32000
        targets = torch.randint(0, vocab, (tokens,), device=DEVICE)
        targets[::7] = -100
        args = [randn(tokens, hidden, dtype=bf16), randn(vocab, hidden, dtype=bf16, scale=0.05, seed=1), targets]
        check_against_float64(kernels.linear_cross_entropy, kernels.linear_cross_entropy_torch, args,
                              [True, True, False], bf16)
        # the [tokens, vocab] logits never exist: the extra peak stays well under their size
        h, w = (a.detach().requires_grad_() for a in args[:2])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kernels.linear_cross_entropy(h, w, targets).backward()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < 0.5 * tokens * vocab * 2
