"""Hash-grid encoding: levels, dense vs hashed rows, trilinear blending, gradients, masking, and
the fused Triton kernel against the PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backend.hashgrid import HashGrid, HashGridConfig, encode_torch, main, triton_available, vertex_rows

REPO = Path(__file__).resolve().parents[2]

# 4 levels: 4, 7, 12, 23 cells per axis; a 1024-row table holds 5^3 and 8^3 vertices (dense),
# not 13^3 or 24^3 (hashed).
TINY = HashGridConfig(num_levels=4, features_per_level=2, log2_table_size=10, base_resolution=4, per_level_scale=1.8)


def tiny_grid(dtype: torch.dtype = torch.float32, init_scale: float = 1.0) -> HashGrid:
    torch.manual_seed(0)
    return HashGrid(TINY, device="cpu", dtype=dtype, implementation="torch", init_scale=init_scale)


def test_levels_resolutions_and_dense_flags():
    assert TINY.resolutions() == [4, 7, 12, 23]
    assert TINY.dense_levels() == [True, True, False, False]
    default = HashGridConfig()
    assert default.resolutions()[0] == 16 and default.resolutions()[-1] == 4096
    assert default.output_dim == 32


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"num_levels.*0"):
        HashGridConfig(num_levels=0)
    with pytest.raises(ValueError, match=r"log2_table_size.*40"):
        HashGridConfig(log2_table_size=40)
    with pytest.raises(ValueError, match=r"implementation.*'cuda'"):
        HashGrid(TINY, device="cpu", implementation="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x_nx3.*\(5, 2\)"):
        tiny_grid()(torch.zeros(5, 2))


def test_output_shape_and_clamping_outside_the_cube():
    grid = tiny_grid()
    x = torch.rand(100, 3) * 2 - 1
    assert grid(x).shape == (100, 8)
    # points outside [-1, 1]^3 read the boundary values
    torch.testing.assert_close(grid(torch.tensor([[1.5, -3.0, 0.2]])), grid(torch.tensor([[1.0, -1.0, 0.2]])))


def test_dense_level_reads_the_vertex_row():
    grid = tiny_grid()
    resolution = 7  # level 1, dense: vertex (i, j, k) is row i + j*8 + k*64
    i, j, k = 3, 5, 2
    x = torch.tensor([[i, j, k]], dtype=torch.float32) / resolution * 2 - 1
    out = grid(x)
    torch.testing.assert_close(out[0, 2:4], grid.table_lxtxf[1, i + j * 8 + k * 64], atol=1e-6, rtol=0)


def test_hashed_level_uses_the_instant_ngp_primes():
    rows = vertex_rows(torch.tensor([[[3, 5, 7]]]), resolution=12, dense=False, table_size=1024)
    assert int(rows) == (3 ^ (5 * 2654435761) ^ (7 * 805459861)) & 1023 == 357
    grid = tiny_grid()
    x = torch.tensor([[3, 5, 7]], dtype=torch.float32) / 12 * 2 - 1
    torch.testing.assert_close(grid(x)[0, 4:6], grid.table_lxtxf[2, 357], atol=1e-6, rtol=0)


def test_interpolation_is_trilinear_and_continuous():
    grid = tiny_grid(dtype=torch.float64)
    # inside one cell of every level the encoding is linear along a short axis-aligned segment
    start = torch.tensor([[0.101, -0.203, 0.307]], dtype=torch.float64)
    step = torch.tensor([[0.0, 2e-3, 0.0]], dtype=torch.float64)
    ends = grid(torch.cat([start, start + step]))
    middle = grid(start + step / 2)
    torch.testing.assert_close(middle[0], ends.mean(dim=0), atol=1e-10, rtol=0)
    # across a cell boundary (x = 0 is a vertex plane of the 4-cell level) values meet
    left = grid(torch.tensor([[-1e-9, 0.3, 0.1]], dtype=torch.float64))
    right = grid(torch.tensor([[1e-9, 0.3, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(left, right, atol=1e-7, rtol=0)


def test_gradcheck_float64():
    # 3 levels of 1, 2 and 4 cells over a 16-row table: the first dense, the others hashed
    config = HashGridConfig(num_levels=3, log2_table_size=4, base_resolution=1, per_level_scale=2.0)
    assert config.dense_levels() == [True, False, False]
    torch.manual_seed(1)
    grid = HashGrid(config, device="cpu", dtype=torch.float64, implementation="torch", init_scale=1.0)
    x = (torch.rand(6, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)

    def encode(points, table):
        return encode_torch(grid.normalize(points), table, grid.resolutions, grid.dense, 3)

    assert torch.autograd.gradcheck(encode, (x, grid.table_lxtxf), eps=1e-6, atol=1e-5)


def test_masked_levels_output_zeros_and_get_no_gradient():
    grid = tiny_grid()
    x = torch.rand(50, 3) * 2 - 1
    full = grid(x)
    grid.set_active_levels(2)
    masked = grid(x)
    torch.testing.assert_close(masked[:, :4], full[:, :4])
    assert bool((masked[:, 4:] == 0).all())
    masked.sum().backward()
    assert grid.table_lxtxf.grad[2:].abs().sum() == 0
    assert grid.table_lxtxf.grad[:2].abs().sum() > 0
    with pytest.raises(ValueError, match=r"levels.*5"):
        grid.set_active_levels(5)


def test_schedule_unmasks_one_level_every_n_steps():
    config = HashGridConfig(num_levels=6, log2_table_size=10, start_levels=2, level_every_steps=100)
    assert [config.levels_at_step(s) for s in (0, 99, 100, 250, 10_000)] == [2, 2, 3, 4, 6]
    grid = HashGrid(config, device="cpu")
    assert grid.active_levels == 2
    grid.update_step(300)
    assert grid.active_levels == 5
    assert HashGridConfig().levels_at_step(0) == 16


def test_benchmark_command_runs_on_cpu(capsys):
    code = main(["--bench", "--device", "cpu", "--points", "2000", "--repeats", "1", "--levels", "4", "--log2-table-size", "12"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "ms forward+backward" in printed
    assert "triton  unavailable" in printed  # needs a CUDA device


TRITON_COMPARE = textwrap.dedent(
    """
    import torch
    from backend import hashgrid_triton
    from backend.hashgrid import HashGrid, HashGridConfig, encode_torch
    config = HashGridConfig(num_levels=4, log2_table_size=10, base_resolution=4, per_level_scale=1.8)
    torch.manual_seed(0)
    grid = HashGrid(config, device=DEVICE, implementation="torch", init_scale=1.0)
    x01 = torch.rand(257, 3, device=DEVICE)
    x01[0] = 1.0  # the upper boundary of every level
    x_ref = x01.clone().requires_grad_(True)
    x_fused = x01.clone().requires_grad_(True)
    ref = encode_torch(x_ref, grid.table_lxtxf, grid.resolutions, grid.dense, 3)
    fused = hashgrid_triton.encode(x_fused, grid.table_lxtxf, grid.resolutions, grid.dense, 3)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * upstream).sum(), [x_ref, grid.table_lxtxf])
    g_fused = torch.autograd.grad((fused * upstream).sum(), [x_fused, grid.table_lxtxf])
    torch.testing.assert_close(g_fused[1], g_ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fused[0], g_ref[0], atol=1e-3, rtol=1e-4)
    # first-order only: differentiating the backward pass raises instead of dropping terms
    fused = hashgrid_triton.encode(x_fused, grid.table_lxtxf, grid.resolutions, grid.dense, 3)
    (g_x,) = torch.autograd.grad(fused.square().sum(), x_fused, create_graph=True)
    try:
        g_x.sum().backward()
    except RuntimeError as error:
        assert "once_differentiable" in str(error), error
    else:
        raise AssertionError("double backward through the fused kernel did not raise")
    print("fused kernel matches")
    """
)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_kernel_matches_torch_in_the_interpreter():
    """The fused kernel's code, run by Triton's CPU interpreter, against the PyTorch reference."""
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO))
    script = "DEVICE = 'cpu'\n" + TRITON_COMPARE
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused kernel matches" in result.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_kernel_matches_torch_on_cuda():
    namespace: dict = {"DEVICE": "cuda"}
    exec(compile(TRITON_COMPARE, "triton_compare", "exec"), namespace)
    # and the module dispatches to it for CUDA inputs
    grid = HashGrid(TINY, device="cuda")
    assert grid.use_triton(torch.zeros(1, 3, device="cuda"))


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_kernels_compile_for_cuda_without_a_gpu(monkeypatch):
    """Triton's compiler (bundled ptxas) builds both kernels for sm_90: catches what the
    interpreter cannot, such as misuse of constexpr in unrolled loops."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from backend import hashgrid_triton

    pointers = {"x01_ptr": "*fp32", "table_ptr": "*fp32", "resolution_ptr": "*i32", "dense_ptr": "*i32"}
    sizes = {"num_points": "i32", "table_size": "i32"}
    shape = {"NUM_LEVELS": 16, "FEATURES": 2, "BLOCK_SIZE": hashgrid_triton.BLOCK}
    forward = ASTSource(
        fn=hashgrid_triton._forward_kernel,
        signature={**pointers, "out_ptr": "*fp32", **sizes, **{name: "constexpr" for name in shape}},
        constexprs=shape,
    )
    backward_signature = {
        **pointers, "grad_out_ptr": "*fp32", "grad_table_ptr": "*fp32", "grad_x01_ptr": "*fp32", **sizes,
        **{name: "constexpr" for name in (*shape, "INPUT_GRAD")},
    }
    backward = ASTSource(
        fn=hashgrid_triton._backward_kernel, signature=backward_signature, constexprs={**shape, "INPUT_GRAD": True}
    )
    for source in (forward, backward):
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
