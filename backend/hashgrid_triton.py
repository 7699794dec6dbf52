"""Fused Triton kernels for the hash encoding (forward and backward), imported only on use.

The PyTorch code in ``backend/hashgrid.py`` is the reference: same level resolutions, same dense
and hashed row indexing, same trilinear weights and the same gradients (the table gradient by
atomic adds, the input gradient from the derivative of the trilinear weights). One program
handles ``BLOCK`` points at one level (grid: point blocks x active levels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 128
"""Points per program."""


@triton.jit
def _corner_rows(cx, cy, cz, resolution, dense, table_size):
    """Table rows (int64) of integer vertex coordinates; same rule as ``hashgrid.vertex_rows``."""
    x64 = cx.to(tl.int64)
    y64 = cy.to(tl.int64)
    z64 = cz.to(tl.int64)
    side = resolution.to(tl.int64) + 1
    dense_rows = x64 + y64 * side + z64 * side * side
    hashed_rows = (x64 ^ (y64 * 2654435761) ^ (z64 * 805459861)) & (table_size - 1)
    return tl.where(dense != 0, dense_rows, hashed_rows)


@triton.jit
def _cell(x01_ptr, offsets, mask, axis: tl.constexpr, resolution):
    """Cell index (int32) and fraction of one axis at one level."""
    pos = tl.load(x01_ptr + offsets * 3 + axis, mask=mask, other=0.0) * resolution.to(tl.float32)
    cell = tl.minimum(tl.maximum(tl.floor(pos), 0.0), (resolution - 1).to(tl.float32))
    return cell.to(tl.int32), pos - cell


@triton.jit
def _forward_kernel(
    x01_ptr, table_ptr, resolution_ptr, dense_ptr, out_ptr,
    num_points, table_size,
    NUM_LEVELS: tl.constexpr, FEATURES: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    level = tl.program_id(1)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < num_points
    features = tl.arange(0, FEATURES)
    resolution = tl.load(resolution_ptr + level)
    dense = tl.load(dense_ptr + level)
    # 1. cell and fraction per axis
    ix, fx = _cell(x01_ptr, offsets, mask, 0, resolution)
    iy, fy = _cell(x01_ptr, offsets, mask, 1, resolution)
    iz, fz = _cell(x01_ptr, offsets, mask, 2, resolution)
    level_base = level.to(tl.int64) * table_size * FEATURES
    acc = tl.zeros((BLOCK_SIZE, FEATURES), dtype=tl.float32)
    # 2. blend the 8 corners
    for corner in tl.static_range(8):
        dx = corner & 1
        dy = (corner >> 1) & 1
        dz = (corner >> 2) & 1
        weight = (fx * dx + (1.0 - fx) * (1 - dx)) * (fy * dy + (1.0 - fy) * (1 - dy)) * (fz * dz + (1.0 - fz) * (1 - dz))
        rows = _corner_rows(ix + dx, iy + dy, iz + dz, resolution, dense, table_size)
        pointers = table_ptr + level_base + rows[:, None] * FEATURES + features[None, :]
        values = tl.load(pointers, mask=mask[:, None], other=0.0)
        acc += weight[:, None] * values
    # 3. write this level's slice of the output row
    out_pointers = out_ptr + offsets[:, None] * (NUM_LEVELS * FEATURES) + level * FEATURES + features[None, :]
    tl.store(out_pointers, acc, mask=mask[:, None])


@triton.jit
def _backward_kernel(
    x01_ptr, table_ptr, resolution_ptr, dense_ptr, grad_out_ptr, grad_table_ptr, grad_x01_ptr,
    num_points, table_size,
    NUM_LEVELS: tl.constexpr, FEATURES: tl.constexpr, BLOCK_SIZE: tl.constexpr, INPUT_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    level = tl.program_id(1)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < num_points
    features = tl.arange(0, FEATURES)
    resolution = tl.load(resolution_ptr + level)
    dense = tl.load(dense_ptr + level)
    ix, fx = _cell(x01_ptr, offsets, mask, 0, resolution)
    iy, fy = _cell(x01_ptr, offsets, mask, 1, resolution)
    iz, fz = _cell(x01_ptr, offsets, mask, 2, resolution)
    grad_pointers = grad_out_ptr + offsets[:, None] * (NUM_LEVELS * FEATURES) + level * FEATURES + features[None, :]
    grad_out = tl.load(grad_pointers, mask=mask[:, None], other=0.0)
    level_base = level.to(tl.int64) * table_size * FEATURES
    grad_fx = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    grad_fy = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    grad_fz = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for corner in tl.static_range(8):
        dx = corner & 1
        dy = (corner >> 1) & 1
        dz = (corner >> 2) & 1
        wx = fx * dx + (1.0 - fx) * (1 - dx)
        wy = fy * dy + (1.0 - fy) * (1 - dy)
        wz = fz * dz + (1.0 - fz) * (1 - dz)
        rows = _corner_rows(ix + dx, iy + dy, iz + dz, resolution, dense, table_size)
        pointers = level_base + rows[:, None] * FEATURES + features[None, :]
        # 1. table gradient: weight * upstream gradient, scattered with atomics
        tl.atomic_add(grad_table_ptr + pointers, (wx * wy * wz)[:, None] * grad_out, mask=mask[:, None])
        # 2. input gradient: upstream . corner features times the weight's derivative
        if INPUT_GRAD:
            values = tl.load(table_ptr + pointers, mask=mask[:, None], other=0.0)
            dot = tl.sum(values * grad_out, axis=1)
            grad_fx += dot * (2 * dx - 1) * wy * wz
            grad_fy += dot * wx * (2 * dy - 1) * wz
            grad_fz += dot * wx * wy * (2 * dz - 1)
    if INPUT_GRAD:
        scale = resolution.to(tl.float32)
        tl.atomic_add(grad_x01_ptr + offsets * 3 + 0, grad_fx * scale, mask=mask)
        tl.atomic_add(grad_x01_ptr + offsets * 3 + 1, grad_fy * scale, mask=mask)
        tl.atomic_add(grad_x01_ptr + offsets * 3 + 2, grad_fz * scale, mask=mask)


def _level_tensors(resolutions: list[int], dense: list[bool], device: torch.device) -> tuple[Tensor, Tensor]:
    resolution_l = torch.tensor(resolutions, dtype=torch.int32, device=device)
    dense_l = torch.tensor([int(d) for d in dense], dtype=torch.int32, device=device)
    return resolution_l, dense_l


class _HashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x01_nx3: Tensor, table_lxtxf: Tensor, resolutions: list[int], dense: list[bool], active_levels: int) -> Tensor:  # type: ignore[override]
        x01_nx3 = x01_nx3.contiguous()
        table_lxtxf = table_lxtxf.contiguous()
        num_levels, table_size, num_features = table_lxtxf.shape
        num_points = x01_nx3.shape[0]
        resolution_l, dense_l = _level_tensors(resolutions, dense, x01_nx3.device)
        out_nxlf = torch.zeros(num_points, num_levels * num_features, dtype=torch.float32, device=x01_nx3.device)
        if active_levels > 0 and num_points > 0:
            grid = (triton.cdiv(num_points, BLOCK), active_levels)
            _forward_kernel[grid](
                x01_nx3, table_lxtxf, resolution_l, dense_l, out_nxlf, num_points, table_size,
                NUM_LEVELS=num_levels, FEATURES=num_features, BLOCK_SIZE=BLOCK,
            )
        ctx.save_for_backward(x01_nx3, table_lxtxf, resolution_l, dense_l)
        ctx.active_levels = active_levels
        return out_nxlf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_nxlf: Tensor):  # type: ignore[override]
        x01_nx3, table_lxtxf, resolution_l, dense_l = ctx.saved_tensors
        num_levels, table_size, num_features = table_lxtxf.shape
        num_points = x01_nx3.shape[0]
        input_grad = ctx.needs_input_grad[0]
        grad_table = torch.zeros_like(table_lxtxf)
        grad_x01_nx3 = torch.zeros_like(x01_nx3) if input_grad else x01_nx3.new_zeros(1)
        if ctx.active_levels > 0 and num_points > 0:
            grid = (triton.cdiv(num_points, BLOCK), ctx.active_levels)
            _backward_kernel[grid](
                x01_nx3, table_lxtxf, resolution_l, dense_l, grad_out_nxlf.contiguous(), grad_table, grad_x01_nx3,
                num_points, table_size,
                NUM_LEVELS=num_levels, FEATURES=num_features, BLOCK_SIZE=BLOCK, INPUT_GRAD=input_grad,
            )
        return (grad_x01_nx3 if input_grad else None), grad_table, None, None, None


def encode(x01_nx3: Tensor, table_lxtxf: Tensor, resolutions: list[int], dense: list[bool], active_levels: int) -> Tensor:
    """Fused twin of ``hashgrid.encode_torch``: points in [0, 1]^3 ``[N, 3]`` -> ``[N, L*F]``
    (float32; features per level a power of two). First-order gradients only."""
    return _HashEncode.apply(x01_nx3, table_lxtxf, resolutions, dense, active_levels)
