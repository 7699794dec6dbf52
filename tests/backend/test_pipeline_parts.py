"""The pipeline's pieces on their own: config presets and job overrides, the checkpoint format,
the streaming cadence, and the pipeline's own loss terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.config import PRESETS, STAGES, config_for_job
from backend.stages import checkpoint as ckpt
from backend.stages.losses import normal_consistency_loss, sum_losses
from backend.stages.stream import Cadence, emit_mesh, preview_png
from protocol.params import validate_submit


def test_presets_grow_from_draft_to_high() -> None:
    draft, standard, high = PRESETS["draft"], PRESETS["standard"], PRESETS["high"]
    for stage in STAGES:
        assert draft.stage_steps(stage) < standard.stage_steps(stage) < high.stage_steps(stage)
    assert draft.coarse.render_res < standard.coarse.render_res < high.coarse.render_res
    assert draft.geometry.dmtet_res < standard.geometry.dmtet_res < high.geometry.dmtet_res
    assert PRESETS["tiny"].coarse.render_res <= 32


def test_job_params_override_the_preset() -> None:
    params = validate_submit("generate", {
        "prompt": "a cat", "quality": "draft", "steps": {"coarse": 20, "geometry": 0},
        "seed": 5, "texture_size": 512, "mesh_every": 10, "preview_every": 3,
        "camera": {"elevation_deg": [0, 30], "reference": {"elevation_deg": 10, "azimuth_deg": 20}},
    }, {})
    config = config_for_job(params)
    assert config.quality == "draft"
    assert (config.coarse.steps, config.geometry.steps) == (20, 0)
    assert config.texture.steps == PRESETS["draft"].texture.steps
    assert config.coarse.render_res == PRESETS["draft"].coarse.render_res
    assert (config.seed, config.texture_size) == (5, 512)
    assert (config.stream.mesh_every, config.stream.preview_every) == (10, 3)
    assert config.camera.elevation_deg == (0.0, 30.0)
    assert config.camera.reference[:2] == (10.0, 20.0)
    # A forced preset (the tiny models) keeps the job's overrides.
    tiny = config_for_job(params, "tiny")
    assert tiny.quality == "tiny" and tiny.coarse.steps == 20
    assert tiny.coarse.render_res == PRESETS["tiny"].coarse.render_res


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="quality: unknown preset 'ultra'"):
        config_for_job({"prompt": "x", "quality": "ultra"})


def test_checkpoint_round_trip_restores_modules_optimisers_and_random_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimiser.step()
    generator = torch.Generator().manual_seed(11)
    torch.rand(3, generator=generator)
    state = ckpt.Checkpoint(
        stage="geometry", step=42, modules={"model": model.state_dict()},
        optimisers={"adam": optimiser.state_dict()}, tensors={"faces_fx3": torch.arange(6).reshape(2, 3)},
        rng=ckpt.capture_rng({"cpu": generator}), job_key="job",
    )
    data = ckpt.to_bytes(state)
    expected_draw = torch.rand(4, generator=generator)
    expected_global = torch.rand(2)
    # 1. Load into fresh objects and compare.
    loaded = ckpt.from_bytes(data)
    assert (loaded.stage, loaded.step, loaded.job_key) == ("geometry", 42, "job")
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(loaded.modules["model"])
    assert torch.equal(fresh.weight, model.weight)
    fresh_optimiser = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_optimiser.load_state_dict(loaded.optimisers["adam"])
    assert fresh_optimiser.state_dict()["state"][0]["step"] == optimiser.state_dict()["state"][0]["step"]
    assert torch.equal(loaded.tensors["faces_fx3"], torch.arange(6).reshape(2, 3))
    other = torch.Generator().manual_seed(999)
    ckpt.restore_rng(loaded.rng, {"cpu": other})
    assert torch.equal(torch.rand(4, generator=other), expected_draw)
    assert torch.equal(torch.rand(2), expected_global)


def test_a_foreign_checkpoint_is_refused_with_a_reason() -> None:
    import json

    import safetensors.torch

    with pytest.raises(ValueError, match="checkpoint: cannot be read"):
        ckpt.from_bytes(b"definitely not a checkpoint")
    with pytest.raises(ckpt.OtherFormat, match="checkpoint: format 99"):
        ckpt.from_bytes(safetensors.torch.save({}, metadata={"dreamloom": json.dumps({"format": 99})}))


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path) -> None:
    """A torch.save blob whose unpickling would run code is refused unread (the store's
    checkpoints are written by whoever can write the store)."""
    import io
    import os

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "ran"),))

    buffer = io.BytesIO()
    torch.save({"format": 2, "payload": Payload()}, buffer)
    with pytest.raises(ValueError, match="checkpoint: cannot be read"):
        ckpt.from_bytes(buffer.getvalue())
    assert not (tmp_path / "ran").exists()


def test_cadence_streams_every_n_steps_and_at_the_stage_end() -> None:
    cadence = Cadence(steps=25, mesh_every=10, preview_every=4, checkpoint_every=10)
    assert [s + 1 for s in range(25) if cadence.mesh_due(s)] == [10, 20, 25]
    assert [s + 1 for s in range(25) if cadence.preview_due(s)] == [4, 8, 12, 16, 20, 24, 25]
    assert [s + 1 for s in range(25) if cadence.checkpoint_due(s)] == [10, 20]
    early = Cadence(steps=600, mesh_every=250, preview_every=25, checkpoint_every=200, first_mesh_at=50)
    assert [s + 1 for s in range(600) if early.mesh_due(s)] == [50, 250, 500, 600]


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict, dict]] = []

    def emit(self, event: str, body: dict, buffers: dict | None = None) -> int:
        self.events.append((event, body, buffers or {}))
        return len(self.events)


def test_emit_mesh_sends_protocol_buffers() -> None:
    sink = _Sink()
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0.5]])
    faces = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    seq = emit_mesh(sink, "coarse", 10, verts, faces, colors_vx3=torch.full((3, 3), 0.5))
    event, body, buffers = sink.events[0]
    assert seq == 1 and event == "mesh"
    assert body == {"stage": "coarse", "step": 10, "final": False, "vertex_count": 3, "face_count": 1,
                    "bbox": [[0.0, 0.0, 0.0], [1.0, 1.0, 0.5]]}
    assert buffers["positions"].dtype == np.dtype("<f4") and buffers["faces"].dtype == np.dtype("<i4")
    assert buffers["colors"].dtype == np.uint8 and int(buffers["colors"][0, 0]) == 128


def test_preview_is_a_png_of_the_render() -> None:
    from PIL import Image
    import io

    png = preview_png(torch.rand(2, 8, 6, 3))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (12, 8)


def test_sum_losses_weights_terms_and_reports_them() -> None:
    total, values = sum_losses({"a": (2.0, torch.tensor(3.0)), "b": (0.0, torch.tensor(5.0))})
    assert float(total) == 6.0 and values == {"a": 3.0, "b": 5.0, "total": 6.0}
    total, values = sum_losses({"a": (1.0, torch.tensor(float("nan")))})
    assert math.isnan(values["total"])


def test_normal_consistency_is_zero_on_a_plane_and_positive_on_a_fold() -> None:
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    assert float(normal_consistency_loss(flat, faces)) == pytest.approx(0.0, abs=1e-6)
    folded = flat.clone()
    folded[3, 2] = 1.0
    assert float(normal_consistency_loss(folded, faces)) > 0.1


def test_over_white_turns_a_render_on_any_background_into_the_render_on_white() -> None:
    from backend.neus import NeuSConfig, NeuSField, render_neus
    from backend.cameras import orbit_cameras
    from backend.hashgrid import HashGridConfig
    from backend.stages.losses import over_white

    torch.manual_seed(0)
    field = NeuSField(NeuSConfig(grid=HashGridConfig(num_levels=2, log2_table_size=8), hidden_dim=8), "cpu")
    cameras = orbit_cameras(1, 10.0, 3.8, 20.0, 12, 12)
    background = torch.tensor([0.2, 0.7, 0.1])
    with torch.no_grad():
        on_colour = render_neus(field, cameras, background, 16, inv_s=50.0)
        on_white = render_neus(field, cameras, torch.ones(3), 16, inv_s=50.0)
    recomposited = over_white(on_colour["rgb"], on_colour["opacity"], background)
    assert torch.allclose(recomposited, on_white["rgb"], atol=1e-5)
    assert not torch.allclose(on_colour["rgb"], on_white["rgb"], atol=1e-2)


def test_opaque_loss_is_largest_for_half_covered_pixels() -> None:
    from backend.stages.losses import opaque_loss

    values = [float(opaque_loss(torch.full((1, 2, 2, 1), a))) for a in (0.0, 0.25, 0.5, 1.0)]
    assert values[2] == pytest.approx(math.log(2), rel=1e-4)
    assert values[0] < values[1] < values[2] and values[3] < values[1]


def test_a_forced_preset_replaces_every_jobs_quality_and_a_bad_one_is_refused_naming_it() -> None:
    from backend.config import PRESETS, config_for_job
    from backend.pipeline import make_runner

    runner = make_runner("tiny", "cpu", preset="small")
    assert runner.preset == "small" and make_runner("tiny", "cpu").preset == "tiny"
    config = config_for_job({"quality": "high", "steps": {"texture": 7}}, runner.preset)
    assert (config.quality, config.coarse, config.texture.steps) == ("small", PRESETS["small"].coarse, 7)
    with pytest.raises(ValueError, match="preset 'huge': expected one of draft, high, small, standard, tiny"):
        make_runner("tiny", "cpu", preset="huge")
