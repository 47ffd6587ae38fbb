"""The skinny GEMM (models/kernels/triton_skinny_gemm.py, run on the CPU by Triton's interpreter): against a float64
product over tile, slice and ragged shapes; the routing of ``SmallBatchLinear`` (one row: the GEMV; more rows: the
GEMM where its measured table names the shape, else ``F.linear``); its tuner's smoke run and table."""

from pathlib import Path

import pytest
import torch
from torch import nn

from bench import measure_skinny_gemm
from models.config_loading import llama_twin
from models.kernels import skinny_gemm_launch as launch_module
from models.kernels.skinny_gemm_launch import SkinnyGemmLaunch
from models.kernels.small_batch_linear import GemvKernel, load_gemv_kernel, use_small_batch_linear
from tests.conftest import tiny_config, tiny_model
from tests.test_small_batch_linear import Recorder

# float32 sums of K products in another order than the float64 reference: a few ulps of the largest partial sum
FP32_BOUND = 64 * torch.finfo(torch.float32).eps


@pytest.fixture
def gemm():
    """The skinny GEMM on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: Triton compiles the kernel for the GPU; bench/measure_skinny_gemm.py checks it")
    kernel = load_gemv_kernel()
    assert kernel is not None and kernel.skinny_gemm is not None
    return kernel.skinny_gemm


@pytest.mark.parametrize(
    "rows, features, columns, launch",
    [
        (32, 64, 128, SkinnyGemmLaunch(16, 32, 32, 1, 4, 1)),  # whole tiles, one slice
        (37, 50, 100, SkinnyGemmLaunch(16, 32, 32, 1, 4, 1)),  # ragged in every dimension
        (37, 50, 100, SkinnyGemmLaunch(32, 16, 16, 3, 4, 1)),  # 7 steps of K in slices of 3, 3 and 1
        (5, 24, 64, SkinnyGemmLaunch(16, 16, 16, 8, 4, 1)),  # more slices than steps: empty slices add zeros
    ],
    ids=str,
)
def test_kernel_equals_float64_product(gemm, rows, features, columns, launch):
    x, weight = torch.randn(rows, columns), torch.randn(features, columns)
    expected = x.double() @ weight.double().T
    out = gemm(x, weight, *launch)
    assert out.shape == (rows, features) and out.dtype == torch.float32
    bound = FP32_BOUND * (x.double().abs() @ weight.double().abs().T).max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=bound)


def test_kernel_in_half_precision(gemm):
    """fp16 tiles (the interpreter computes fp16 dots right; its bf16 dot does not, so bf16 is the GPU tests')."""
    x, weight = torch.randn(37, 100).half(), (torch.randn(50, 100) / 10).half()
    out = gemm(x, weight, *SkinnyGemmLaunch(16, 16, 32, 2, 4, 1))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), x.float() @ weight.float().T, rtol=2e-3, atol=2e-3)


def test_kernel_reads_strided_rows(gemm):
    wide, weight = torch.randn(20, 96), torch.randn(24, 64)
    x = wide[:, :64]
    torch.testing.assert_close(gemm(x, weight, *SkinnyGemmLaunch(16, 16, 32, 2, 4, 1)), x @ weight.T)


def test_routing_follows_the_measured_table(monkeypatch):
    gemv, gemm = Recorder(), Recorder()
    layer = nn.Linear(16, 8, bias=True)
    assert use_small_batch_linear(layer, GemvKernel(gemv, frozenset({"cpu"}), gemm)) == 1
    monkeypatch.setattr(launch_module, "TUNED", {(4, 8, 16, 4): SkinnyGemmLaunch(16, 16, 16, 1, 4, 1)})
    with torch.no_grad():
        x = torch.randn(4, 16)
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)  # in the table: the GEMM, bias added
        layer(torch.randn(1, 16))  # one row: the GEMV
        layer(torch.randn(3, 16))  # not in the table: F.linear
        layer(torch.randn(2, 2, 16))  # 4 rows again, as (batch, tokens)
    assert gemm.rows == [4, 4] and gemv.rows == [1]


def test_without_the_gemm_op_the_table_is_not_used(monkeypatch):
    gemv = Recorder()
    layer = nn.Linear(16, 8, bias=False)
    use_small_batch_linear(layer, GemvKernel(gemv, frozenset({"cpu"})))
    monkeypatch.setattr(launch_module, "TUNED", {(4, 8, 16, 4): SkinnyGemmLaunch(16, 16, 16, 1, 4, 1)})
    with torch.no_grad():
        x = torch.randn(4, 16)
        torch.testing.assert_close(layer(x), x @ layer.weight.T)
    assert gemv.rows == []


def test_benchmark_smoke_and_apply(gemm, tmp_path, monkeypatch):
    module = tmp_path / "skinny_gemm_launch.py"
    module.write_text(Path(launch_module.__file__).read_text())
    monkeypatch.setattr(measure_skinny_gemm, "LAUNCH_MODULE", module)
    out = measure_skinny_gemm.main(["--smoke", "--apply", "--min_gain", "-1e9", "--output_dir", str(tmp_path)])
    assert (tmp_path / "skinny_gemm.json").exists()
    shapes = out["shapes"]
    assert shapes and all(entry["max_abs_error_vs_fp32"] < 1e-3 for row in shapes for entry in row["search"])
    assert all(row["best"]["ms"] > 0 and row["cublas_ms"] > 0 for row in shapes)
    # --min_gain -1e9 takes every measured shape (the interpreter is far slower than cuBLAS): the table names each
    written = module.read_text()
    assert all(f"({row['rows']}, {row['N']}, {row['K']}, 4)" in written for row in shapes)


def test_table_takes_a_launch_only_where_it_beats_cublas():
    launch = SkinnyGemmLaunch(16, 16, 16, 1, 4, 1)
    rows = [
        {"rows": 8, "N": 64, "K": 32, "cublas_ms": 1.0, "best": launch._asdict() | {"ms": 0.8}},  # 20% faster
        {"rows": 8, "N": 96, "K": 32, "cublas_ms": 1.0, "best": launch._asdict() | {"ms": 0.95}},  # 5%: not enough
    ]
    kept = {(16, 1, 1, 4): launch}  # a measured row of another shape stays
    table = measure_skinny_gemm.gemm_table(rows, 4, 0.1, kept)
    assert table == {(8, 64, 32, 4): launch, (16, 1, 1, 4): launch}


def test_gemm_layer_traces_into_one_graph(gemm, monkeypatch):
    """Under dynamo (the compiled decode step) the routing traces into one graph with no break, and runs the GEMM."""
    layer = nn.Linear(64, 32, bias=False)
    calls = Recorder(gemm)
    use_small_batch_linear(layer, GemvKernel(Recorder(), frozenset({"cpu"}), calls))
    monkeypatch.setattr(launch_module, "TUNED", {(4, 32, 64, 4): SkinnyGemmLaunch(16, 16, 32, 2, 4, 1)})
    x = torch.randn(4, 64)
    with torch.no_grad():
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), x @ layer.weight.T, rtol=1e-5, atol=1e-5)
    assert calls.rows and set(calls.rows) == {4}


@pytest.mark.parametrize("name", ["opt-llama", "llama"])
def test_batch_decoding_through_the_gemm_gives_the_same_tokens(gemm, monkeypatch, name):
    """A table naming every product of a batch-3 decode step: the steps run the GEMM, the greedy tokens are those of
    ``F.linear``."""
    config = tiny_config()
    model = tiny_model(config if name == "opt-llama" else llama_twin(config))
    ids = torch.randint(3, 256, (3, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)}
    launch = SkinnyGemmLaunch(16, 32, 32, 2, 4, 1)
    monkeypatch.setattr(launch_module, "TUNED", {(3, n, k, 4): launch for n, k in shapes})
    calls = Recorder(gemm)
    use_small_batch_linear(model, GemvKernel(Recorder(), frozenset({"cpu"}), calls))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), expected)
    assert calls.rows and set(calls.rows) == {3}


def test_a_wrong_launch_is_never_timed():
    """A launch whose product is off by more than the output's rounding is recorded untimed: it cannot win."""
    wrong = measure_skinny_gemm.SMOKE_SEARCH[0]

    def gemm(x, weight, *launch):
        return x @ weight.T + (1.0 if SkinnyGemmLaunch(*launch) == wrong else 0.0)

    args = measure_skinny_gemm.parse_args(["--smoke"])
    row = measure_skinny_gemm.measure_shape(gemm, 24, 32, 8, args, torch.device("cpu"), torch.float32)
    first, second = row["search"]
    assert "ms" not in first and first["max_abs_error_vs_fp32"] == pytest.approx(1.0)
    assert "ms" in second and row["best"]["block_n"] == measure_skinny_gemm.SMOKE_SEARCH[1].block_n
