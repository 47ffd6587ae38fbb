"""The small-batch GEMV (models/kernels/small_batch_linear.py, triton_gemv.py): its launch rule, the kernel against a
float64 product (run on the CPU by Triton's interpreter), the layer swap on an LCKV model and a transformers Llama
(same state dict, same logits and greedy tokens), where it falls back to ``F.linear``, and its benchmark's smoke run."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from bench import measure_small_batch_gemv
from models.config_loading import llama_twin
from models.kernels import gemv_launch as gemv_launch_module
from models.kernels import small_batch_linear
from models.kernels.gemv_launch import GemvLaunch, gemv_launch
from models.kernels.grouped_linear import gated_product
from models.kernels.small_batch_linear import (
    MAX_ROWS,
    GemvKernel,
    SmallBatchLinear,
    load_gemv_kernel,
    use_small_batch_linear,
)
from tests.conftest import load_interpreted, tiny_config, tiny_model
from tests.test_generation import run as run_generation_with
from tools import latency
from tools.cli import UsageError, set_linear_options
from tools.measure import load_config_for_length

# float32 sums of K products in another order than the float64 reference: a few ulps of the largest partial sum
FP32_BOUND = 64 * torch.finfo(torch.float32).eps


@pytest.fixture
def gemv() -> GemvKernel:
    """The kernel on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    return load_interpreted(load_gemv_kernel, "tests/test_small_batch_linear_gpu.py")


class Recorder:
    """An op in a swapped layer's place recording each call's rows and weight shape: ``op``'s product (the real
    kernel: a test of the swap must see it run), else ``x @ weight.T``."""

    def __init__(self, op=None):
        self.op, self.rows, self.shapes = op, [], []

    def __call__(self, x, weight, *launch):
        self.rows.append(x.shape[0])
        self.shapes.append(tuple(weight.shape))
        return x @ weight.T if self.op is None else self.op(x, weight, *launch)


@pytest.fixture
def counting(gemv, monkeypatch) -> Recorder:
    """``gemv`` wrapped in a recorder, and what ``load_gemv_kernel`` returns (the tools' path)."""
    counter = Recorder(gemv.run)
    monkeypatch.setattr(small_batch_linear, "load_gemv_kernel", lambda: GemvKernel(counter, gemv.devices))
    return counter


@pytest.mark.parametrize(
    "features, columns, value_bytes, expected",
    [
        (2048, 2048, 2, GemvLaunch(2, 1024, 4)),
        (4096, 11008, 2, GemvLaunch(4, 1024, 2)),  # from WIDE_FEATURES out features: blocks of 4, two warps
        (64, 48, 4, GemvLaunch(2, 64, 4)),  # block_k: the next power of two of K
        (8, 4, 4, GemvLaunch(2, 16, 4)),  # ... at least 16
    ],
)
def test_launch_rule(monkeypatch, features, columns, value_bytes, expected):
    monkeypatch.setattr(gemv_launch_module, "TUNED", {})
    assert gemv_launch(1, features, columns, value_bytes) == expected


def test_launch_table_wins_at_one_row_only(monkeypatch):
    tuned = GemvLaunch(8, 256, 8)
    monkeypatch.setattr(gemv_launch_module, "TUNED", {(2048, 2048, 2): tuned})
    assert gemv_launch(1, 2048, 2048, 2) == tuned
    assert gemv_launch(1, 2048, 2048, 4) == GemvLaunch(2, 1024, 4)  # another dtype: the rule
    assert gemv_launch(2, 2048, 2048, 2) == GemvLaunch(2, 1024, 4)


@pytest.mark.parametrize("rows, features, columns", [(1, 64, 48), (3, 100, 200), (8, 37, 513), (5, 256, 1024)])
def test_kernel_equals_float64_product(gemv, rows, features, columns):
    x, weight = torch.randn(rows, columns), torch.randn(features, columns)
    expected = x.double() @ weight.double().T
    out = gemv.run(x, weight, *GemvLaunch(4, 64, 4))
    assert out.dtype == torch.float32 and out.shape == (rows, features)
    scale = (x.double().abs() @ weight.double().abs().T).max()
    assert (out.double() - expected).abs().max() <= FP32_BOUND * scale


def test_kernel_reads_strided_rows(gemv):
    """Rows of ``x`` a slice of a wider tensor (unit stride along K only)."""
    wide, weight = torch.randn(4, 96), torch.randn(24, 64)
    x = wide[:, :64]
    out = gemv.run(x, weight, *GemvLaunch(4, 64, 4))
    torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)


def silu_gated_reference(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` of ``x (M, K)`` and a fused ``weight (2I, K)`` in float64, and a bound on a float32
    kernel's error per output: the products' bound (``FP32_BOUND`` of the largest partial sum) carried through
    ``silu(g) * u`` (|silu'| <= 1.1), plus the float32 rounding of the result."""
    gate, up = (x.double() @ weight.double().T).chunk(2, dim=-1)
    silu = gate * torch.sigmoid(gate)
    scale = (x.double().abs() @ weight.double().abs().T).max()
    bound = FP32_BOUND * scale * (1.1 * up.abs() + silu.abs()) + FP32_BOUND * (silu * up).abs()
    return silu * up, bound


@pytest.mark.parametrize("launch", [GemvLaunch(2, 64, 4), GemvLaunch(4, 32, 4), GemvLaunch(8, 64, 2)], ids=str)
@pytest.mark.parametrize("rows, half, columns", [(1, 48, 64), (1, 37, 200), (3, 5, 33)])
def test_silu_gated_kernel_equals_float64_reference(gemv, launch, rows, half, columns):
    """Gate row j and up row j side by side in each program, ragged sizes included: ``silu(gate) * up``."""
    x, weight = torch.randn(rows, columns), torch.randn(2 * half, columns)
    expected, bound = silu_gated_reference(x, weight)
    out = gemv.silu_gated(x, weight, *launch)
    assert out.dtype == torch.float32 and out.shape == (rows, half)
    assert ((out.double() - expected).abs() <= bound).all()


def test_one_row_of_a_fused_gate_up_layer_runs_the_gated_kernel(gemv):
    """``gated_product``: one row of a ``SmallBatchLinear`` gate/up layer with SiLU is one gated GEMV; more rows, a
    bias or another activation split the product (``F.linear`` / the plain GEMV) instead; the same values."""
    gated = Recorder(gemv.silu_gated)
    layer = nn.Linear(40, 2 * 24, bias=False)
    assert use_small_batch_linear(layer, gemv._replace(silu_gated=gated)) == 1
    silu, gelu = ACT2FN["silu"], ACT2FN["gelu"]
    with torch.no_grad():
        for x, activation, calls in [
            (torch.randn(1, 1, 40), silu, 1),
            (torch.randn(2, 40), silu, 0),
            (torch.randn(1, 40), gelu, 0),
        ]:
            before = len(gated.rows)
            out = gated_product(x, layer, activation)
            gate, up = nn.functional.linear(x, layer.weight).chunk(2, dim=-1)
            torch.testing.assert_close(out, activation(gate) * up, rtol=1e-5, atol=1e-5)
            assert len(gated.rows) - before == calls
        layer.bias = nn.Parameter(torch.randn(48))
        assert layer.silu_gated(torch.randn(1, 40)) is None


def test_an_empty_batch_gives_an_empty_product(gemv):
    layer = nn.Linear(16, 8, bias=False)
    use_small_batch_linear(layer, gemv)
    with torch.no_grad():
        assert layer(torch.randn(0, 16)).shape == (0, 8)
        assert gated_product(torch.randn(0, 1, 16), layer, ACT2FN["silu"]).shape == (0, 1, 4)


def models_under_test():
    config = tiny_config()
    return {"opt-llama": tiny_model(config), "llama": tiny_model(llama_twin(config))}


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_swapped_model_keeps_its_state_and_its_outputs(counting, name):
    model = models_under_test()[name]
    linears = sum(type(m) is nn.Linear for m in model.modules())
    state = model.state_dict()
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
        assert use_small_batch_linear(model) == linears > 0
        assert all(type(m) is not nn.Linear for m in model.modules())
        assert model.state_dict().keys() == state.keys()
        assert all(model.state_dict()[k] is not None and model.state_dict()[k].equal(v) for k, v in state.items())
        # 14 rows: F.linear (above MAX_ROWS); the generate's decode steps: one row each, the GEMV
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
        assert model.generate(ids[:1], max_new_tokens=3, do_sample=False).equal(tokens)
        assert counting.rows and set(counting.rows) == {1}  # the decode steps ran the GEMV, only at one row
        one_row = model(ids[:1, :1]).logits
    torch.testing.assert_close(one_row, logits[:1, :1], rtol=1e-5, atol=1e-5)
    assert type(copy.deepcopy(model).lm_head) is SmallBatchLinear  # a swapped model copies (the op is shared)


def recording_layer(bias: bool = False) -> tuple[SmallBatchLinear, Recorder]:
    layer = nn.Linear(16, 8, bias=bias)
    recorder = Recorder()
    assert use_small_batch_linear(layer, GemvKernel(recorder, frozenset({"cpu"}))) == 1
    return layer, recorder


def test_routing_to_the_gemv_and_back_to_f_linear():
    layer, recorder = recording_layer()
    with torch.no_grad():
        layer(torch.randn(1, 1, 16))  # one row
        layer(torch.randn(MAX_ROWS + 1, 16))
        layer(torch.randn(1, 16))
        layer.double()
        layer(torch.randn(1, 16, dtype=torch.float64))  # float64: not a GEMV dtype
    assert recorder.rows == [1, 1]
    layer.float()
    x = torch.randn(1, 16, requires_grad=True)
    layer(x).sum().backward()  # training: F.linear, which has a backward
    assert recorder.rows == [1, 1] and x.grad is not None


def test_bias_is_added():
    layer, recorder = recording_layer(bias=True)
    x = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert recorder.rows == [1]


def test_no_kernel_changes_nothing(monkeypatch):
    monkeypatch.setattr(small_batch_linear, "load_gemv_kernel", lambda: None)
    layer = nn.Linear(4, 4)
    assert use_small_batch_linear(layer) == 0 and type(layer) is nn.Linear


def test_model_off_the_kernels_devices_or_sharded_changes_nothing(monkeypatch):
    cuda_only = GemvKernel(Recorder(), frozenset({"cuda"}))
    layer = nn.Linear(4, 4)  # on the CPU
    assert use_small_batch_linear(layer, cuda_only) == 0 and type(layer) is nn.Linear
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: transformers' TP keeps nn.Linear's forward
    assert use_small_batch_linear(layer, GemvKernel(Recorder(), frozenset({"cpu"}))) == 0


def test_loader_follows_the_environment():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the kernel loads for CUDA whatever the environment")
    assert load_gemv_kernel({}) is None
    assert load_gemv_kernel({"TRITON_INTERPRET": "1"}).devices == {"cpu"}


def test_benchmark_smoke_and_apply(gemv, tmp_path, monkeypatch):
    module = tmp_path / "gemv_launch.py"
    module.write_text(Path(gemv_launch_module.__file__).read_text())
    monkeypatch.setattr(measure_small_batch_gemv, "GEMV_LAUNCH", module)
    out = measure_small_batch_gemv.main(
        ["--smoke", "--search", "--min_gain", "-1", "--apply", "--output_dir", str(tmp_path)]
    )
    written = json.loads((tmp_path / "small_batch_gemv.json").read_text())
    assert written == json.loads(json.dumps(out))
    shapes = {(row["N"], row["K"]) for row in written["shapes"]}
    assert len(shapes) == len(written["shapes"]) >= 4  # each distinct weight shape once
    for row in written["shapes"]:
        assert row["max_abs_error_vs_fp32"] < 1e-4
        assert (
            GemvLaunch(row["best"]["block_n"], row["best"]["block_k"], row["best"]["num_warps"])
            in (measure_small_batch_gemv.SEARCH[: measure_small_batch_gemv.SMOKE_SEARCH])
        )
        assert row["current"]["speedup_vs_cublas"] == pytest.approx(row["cublas_ms"] / row["current"]["ms"])
    # --min_gain -1: every searched shape's best launch enters the table (over the current one's rows), written into
    # the module's copy; the rest of the module is kept
    source, original = module.read_text(), Path(gemv_launch_module.__file__).read_text()
    assignment = source_table(source)
    namespace: dict = {"GemvLaunch": GemvLaunch}
    exec(assignment, namespace)
    head, tail = source.split(assignment)
    assert head.rsplit("# ", 1)[0] == original.split(source_table(original))[0].rsplit("# ", 1)[0]
    assert head.endswith("# cpu (4 SMs), torch.float32, min_gain -1.0\n")  # the comment names the run
    assert tail == original.split(source_table(original))[1]
    expected = gemv_launch_module.TUNED | {
        (row["N"], row["K"], 4): GemvLaunch(row["best"]["block_n"], row["best"]["block_k"], row["best"]["num_warps"])
        for row in written["shapes"]
    }
    assert namespace["TUNED"] == expected
    assert written["table"] == {repr(key): launch._asdict() for key, launch in expected.items()}


def source_table(source: str) -> str:
    """The ``TUNED`` assignment of ``gemv_launch.py``'s source, from ``TUNED:`` to its closing line."""
    start = source.index("TUNED:")
    line = source[start : source.index("\n", start) + 1]
    return line if line.rstrip().endswith("{}") else source[start : source.index("\n}\n", start) + 3]


def test_table_keeps_unmeasured_rows_and_needs_the_gain():
    kept, old, fast = GemvLaunch(2, 128, 2), GemvLaunch(4, 512, 4), GemvLaunch(2, 1024, 4)

    def row(n, best_ms, current_ms):
        return {"N": n, "K": 64, "rows": 1, "best": fast._asdict() | {"ms": best_ms}, "current": {"ms": current_ms}}

    current = {(1, 64, 2): kept, (2, 64, 2): old, (3, 64, 2): old}
    rows = [row(2, 0.9, 1.0), row(3, 0.99, 1.0), row(4, 0.5, 1.0), row(5, 0.99, 1.0)]
    table = measure_small_batch_gemv.gemv_table(rows, 2, 0.03, current)
    # 2: 10% faster, replaced; 3: 1% faster, kept as it was; 4: new; 5: the rule stays (no row); 1: not measured
    assert table == {(1, 64, 2): kept, (2, 64, 2): fast, (3, 64, 2): old, (4, 64, 2): fast}
    assert "{}" in measure_small_batch_gemv.table_literal({}, "nothing measured")


@pytest.mark.parametrize(
    "config, extra", [("opt.json", []), ("opt.json", ["--prefill", "sequential"]), ("llama.json", [])]
)
def test_run_generation_flag_gives_the_same_greedy_text(counting, tiny_files, config, extra):
    """``--small_batch_gemv`` in run_generation.py: every decode step (and each token of LCKV's sequential prefill at
    batch 1) through the GEMV, the text of ``F.linear``."""
    args = ("--prompt", "ROMEO: But soft", "--max_new_tokens", "4", "--ignore_eos", "--quiet", "--static_cache", *extra)
    plain = run_generation_with(tiny_files, *args, config=config)
    assert not counting.rows
    gemv_run = run_generation_with(tiny_files, *args, "--small_batch_gemv", config=config)
    assert gemv_run["cache"]["text"] == plain["cache"]["text"]
    assert counting.rows and set(counting.rows) == {1}


def test_latency_flag_swaps_the_layers(counting):
    args = latency.parse_args(["--small_batch_gemv", "--device", "cpu", "--prompt_len", "8", "--gen_len", "8"])
    model = latency.build_model(load_config_for_length("configs/test_tiny_opt.json", 16), args, torch.float32)
    assert any(isinstance(m, SmallBatchLinear) for m in model.modules())
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_flag_without_a_kernel_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(small_batch_linear, "load_gemv_kernel", lambda: None)
    with pytest.raises(UsageError, match=r"--small_batch_gemv: no layer can run the GEMV here \(model on cpu\)"):
        set_linear_options(nn.Linear(4, 4), fused_projections=False, small_batch_gemv=True)


def test_swapped_layer_traces_into_one_graph(counting):
    """Under dynamo (the compiled decode step) the forward's checks are constants of the trace: one graph, no break."""
    layer = nn.Linear(64, 32, bias=False)
    use_small_batch_linear(layer)
    x = torch.randn(1, 64)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    with torch.no_grad():
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), x @ layer.weight.T, rtol=1e-5, atol=1e-5)
    assert 1 in counting.rows
