"""xatlas charting and packing, with the options measured for speed (docs/benchmarks.md).

`chart` is what `backend.texture.unwrap` runs in a worker process (`backend.worker`), so a cancel
stops it; like every function the worker runs, this module imports no torch.
"""

from __future__ import annotations

import numpy as np

MAX_CHART_COST = 2.0
"""xatlas `ChartOptions.max_cost`: how far a chart may grow before a new one starts."""
BLOCK_ALIGN = False
"""xatlas `PackOptions.blockAlign`: pack charts on 4x4 blocks."""


def chart(verts_vx3: np.ndarray, faces_fx3: np.ndarray, texture_size: int,
          padding_texels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vmapping [V'] int64, faces [F, 3] int32, uvs [V', 2] float32 in [0, 1]) of one atlas
    packed for a `texture_size`² image with `padding_texels` between charts."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(verts_vx3, dtype=np.float32),
                   np.ascontiguousarray(faces_fx3, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_cost = MAX_CHART_COST
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding_texels
    pack.bilinear = True
    pack.blockAlign = BLOCK_ALIGN
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected 1")
    vmapping, indices, uvs = atlas[0]
    return (vmapping.astype(np.int64), indices.astype(np.int32),
            np.clip(uvs, 0.0, 1.0).astype(np.float32))
