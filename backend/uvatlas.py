"""xatlas charting and packing: what `backend.texture.unwrap` runs in a worker process
(`backend.worker`), so a cancel stops it; like every function the worker runs, this module
imports no torch.

Chart options measured for CPU time on a 50k-face surface (docs/benchmarks.md, "Mesh budget"):
xatlas's defaults (`max_cost` 2) took 16 CPU seconds, most of it growing and parameterising large
charts; `max_cost` 0.5 takes 7.2, for 128 charts instead of 62. Dropping the chart-growing
iteration as well (4.7 s) left charts too small for a 256² texture on spot: faces whose centre
no texel covers, baked with a neighbour's colour.
"""

from __future__ import annotations

import numpy as np

CHART_ITERATIONS = 1
"""xatlas `ChartOptions.max_iterations`: rounds of chart growing (its default)."""
CHART_MAX_COST = 0.5
"""xatlas `ChartOptions.max_cost`: how far a chart grows before a new one starts (default 2)."""


def chart(verts_vx3: np.ndarray, faces_fx3: np.ndarray, texture_size: int,
          padding_texels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vmapping [V'] int64, faces [F, 3] int32, uvs [V', 2] float32 in [0, 1]) of one atlas
    packed for a `texture_size`² image with `padding_texels` between charts."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts_vx3, dtype=np.float32),
                   np.ascontiguousarray(faces_fx3, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_iterations = CHART_ITERATIONS
    charts.max_cost = CHART_MAX_COST
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding_texels
    pack.bilinear = True
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected 1")
    vmapping, indices, uvs = atlas[0]
    return (vmapping.astype(np.int64), indices.astype(np.int32),
            np.clip(uvs, 0.0, 1.0).astype(np.float32))
