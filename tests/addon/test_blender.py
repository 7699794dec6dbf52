"""The extension in the bpy module, installed from the zip `build.py addon` makes; every test runs
in each Blender of tests/addon/blenders.py (bpy 5.0.1 on Python 3.11, bpy 5.2.3 on Python 3.13).

Each scenario runs in its own process (tests/addon/blender_driver.py) with a throw-away
BLENDER_USER_RESOURCES, against a real backend server in another process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.addon.blenders import bpy_python
from tests.backend.mesh_runner import ServerProcess, start_server_process

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared"
REFERENCE_IMAGE = REPO / "docs" / "images" / "demo_reference.png"
"""The demo's sample reference image: spot rendered from the reference view, alpha = mask."""


@pytest.fixture(scope="module")
def mesh_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server with the mesh-streaming runner (a short sleep per step)."""
    folder = tmp_path_factory.mktemp("mesh_server")
    server = start_server_process(folder / "store", folder / "server.log", "--step-delay", "0.05")
    yield server
    server.kill()


def blender(scenario: str, addon_zip: Path, tmp_path: Path, *args: str, timeout_s: float = 120) -> dict:
    """Run one driver scenario in a fresh bpy process (the test's Blender); its RESULT as a dict."""
    env = dict(os.environ, PYTHONPATH=str(REPO), BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"))
    proc = subprocess.run(
        [bpy_python(), "-m", "tests.addon.blender_driver", scenario, "--zip", str(addon_zip), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"{scenario} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def blender_local(scenario: str, addon_zip: Path, tmp_path: Path, *args: str) -> dict:
    """A scenario in LOCAL mode: the add-on starts the real backend itself (`python -m backend
    serve --models tiny --device cpu`, the real pipeline with tiny random models, from this .venv
    whichever Blender runs) and the scenario stops it at the end; checks that it did. The job
    takes about 16 s on an idle 2-core machine and has taken 215-265 s at load average 11-17."""
    result = blender(scenario, addon_zip, tmp_path, "--local-store", str(tmp_path / "store"),
                     "--backend-python", sys.executable, *args,
                     "--timeout", "420", timeout_s=480)
    assert result["local_backend_exit"] is not None  # Stop Backend ended the process
    assert any("listening on" in line for line in result["local_backend_log"])
    return result


def test_install_enable_disable_enable(addon_zip: Path, tmp_path: Path):
    result = blender("install", addon_zip, tmp_path, "--save", str(tmp_path / "keys"))
    assert result["client_keys"] == ["client.key", "client.key_secret"]  # Make Client Keys
    assert result["protocol_package"] == "bl_ext.user_default.dreamloom.protocol"  # the vendored copy
    assert result["prefs"] == ["LOCAL", "tcp://127.0.0.1:5555"]
    assert result["disabled"] and not result["scene_prop_after_disable"] and not result["operator_after_disable"]
    assert result["enabled_again"] and result["scene_prop_after_enable"] and result["panel_registered"]
    assert result["enabled_third_time"]


def test_generate_updates_one_object_in_place(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("generate", addon_zip, tmp_path, "--address", mesh_server.address,
                     "--steps", "coarse=3,geometry=2,texture=2")
    assert result["job_state"] == "done" and result["objects"] == ["a spot cow"]
    updates = result["states"]
    seqs = [s["seq"] for s in updates]
    assert len(set(seqs)) >= 3 and seqs == sorted(seqs)  # replaced in place several times
    assert len({(s["object"], s["mesh"]) for s in updates}) == 1  # same object, same mesh datablock
    assert len({round(s["top_z"], 5) for s in updates}) >= 3  # the geometry really changed
    assert result["location"] == [1.0, 2.0, 3.0] and result["modifiers"] == ["Bevel"]  # the artist's edits kept
    assert result["object_seq"] == result["last_seq"] == seqs[-1]
    assert result["object_job_id"] == result["job_id"]




def test_cancel(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("cancel", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", "coarse=400")
    assert result["job_state"] == "cancelled"
    # While it ran, the backend's job list showed it with the worker running it.
    running = [label for label in result["labels"] if ": running" in label]
    assert len(running) == 1 and running[0].startswith("a spot cow: running "), result["labels"]
    assert running[0].endswith(" on local"), result["labels"]


def test_reopened_file_catches_up_without_duplicates(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    saved = tmp_path / "halfway.blend"
    steps = "coarse=6,geometry=4,texture=4"
    first = blender("stop_after", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", steps,
                    "--save", str(saved), "--stop-seq", "4")
    assert first["job_state"] == "running" and first["object_seq"] == first["last_seq"] >= 4
    second = blender("reopen", addon_zip, tmp_path, "--address", mesh_server.address, "--save", str(saved))
    assert second["seq_at_open"] == first["last_seq"]
    assert second["job_state"] == "done" and second["jobs"] == 1
    assert second["objects"] == ["a spot cow"]  # caught up into the same object, no duplicate
    # stage + mesh per step + final mesh, plus the queued/running/done states
    assert second["last_seq"] == second["object_seq"] == 3 + 6 + 4 + 4 + 1 + 3


def test_wrong_address_fails_fast_with_a_message(addon_zip: Path, tmp_path: Path):
    result = blender("wrong_address", addon_zip, tmp_path, "--address", "tcp://127.0.0.1:9")
    assert result["submit_s"] < 0.5  # Generate never waits on the network
    assert result["fail_s"] < 6.0
    assert "tcp://127.0.0.1:9" in result["message"] and "no reply" in result["message"]
    assert result["panel_field"] == "backend_address"


def test_bad_input_is_reported_with_its_field(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("bad_input", addon_zip, tmp_path, "--address", mesh_server.address)
    assert "steps" in result["steps"] and "lots" in result["steps"]
    assert "image_path" in result["image_path"] and "/no/such.png" in result["image_path"]
    assert "params.prompt" in result["prompt"]
    assert "backend_address" in result["backend_address"] and "localhost:5555" in result["backend_address"]


def test_textured_mesh_events_weld_uv_and_pack(addon_zip: Path, tmp_path: Path):
    """Real spot data (split along its seams, its PNG) through the codec into the importer."""
    result = blender("import_textured", addon_zip, tmp_path, "--mesh", str(SHARED / "meshes" / "spot.obj"),
                     "--save", str(tmp_path / "textured.blend"))
    assert result["sent_vertices"] > result["obj_vertices"] == 2930  # seams were split on the wire
    first, final = result["results"]
    assert first["verts"] == final["verts"] == 2930 and final["faces"] == 5856  # welded back
    assert (first["object"], first["mesh"]) == (final["object"], final["mesh"]) and final["seq"] == 2
    assert final["top_z"] == pytest.approx(2 * first["top_z"])  # replaced in place
    assert result["uv_error"] == 0.0  # every corner kept its UV
    assert result["collection"] == ["a textured cow"]
    # after saving and reopening: the material, its packed texture, the UV map
    assert result["material"] == "Dreamloom a textured cow"
    assert result["image_packed"] and result["image_size"] == [1024, 1024]
    assert result["uv_maps"] == ["UVMap"]


def test_generate_with_a_local_tiny_backend_ends_textured(addon_zip: Path, tmp_path: Path):
    """LOCAL mode: the add-on starts the real backend (real pipeline, tiny random models, CPU)
    itself, generates from the sample reference image, and stops the backend."""
    result = blender_local("generate", addon_zip, tmp_path, "--image", str(REFERENCE_IMAGE),
                           "--steps", "coarse=1,geometry=1,texture=1", "--target-faces", "100")
    assert result["job_state"] == "done", result["job_error"]
    # The budget under the minimum is the backend's `note`, reported to the artist with the job.
    assert any(note.startswith("job '") and "500" in note for note in result["notes"]), result["notes"]
    assert result["faces"] <= 500
    assert len(result["objects"]) == 1
    seqs = [s["seq"] for s in result["states"]]
    assert len(set(seqs)) >= 2 and len({(s["object"], s["mesh"]) for s in result["states"]}) == 1
    assert result["location"] == [1.0, 2.0, 3.0] and result["modifiers"] == ["Bevel"]
    assert result["material"] and result["image_packed"] and result["uv_maps"] == ["UVMap"]
    assert result["verts"] > 0 and result["object_seq"] == result["last_seq"]
    assert result["preview_size"] and min(result["preview_size"]) > 0  # the panel's latest preview


def test_refine_on_spot_with_a_local_tiny_backend_keeps_its_geometry(addon_zip: Path, tmp_path: Path):
    """Refine texture on spot through the real backend (LOCAL mode, tiny models, CPU): the
    vertices stay where they were, the object gets a new material whose base colour is a packed
    image texture, and it has a UV map; the .blend is saved and reopened."""
    result = blender_local("refine", addon_zip, tmp_path, "--mesh", str(SHARED / "meshes" / "spot.obj"),
                           "--steps", "texture=2", "--save", str(tmp_path / "refined.blend"))
    assert result["job_state"] == "done" and result["job_kind"] == "refine_texture", result["job_error"]
    assert result["after_verts"] == result["before"]["verts"] == 2930
    assert result["after_loops"] == result["before"]["loops"]
    assert result["max_position_change"] == 0.0  # geometry untouched, coordinate by coordinate
    assert result["before"]["material"] is None and result["material"] == "Dreamloom spot"  # a new material
    assert result["base_color_node"] == "TEX_IMAGE" and result["base_color_image_packed"]
    assert result["image_size"] and min(result["image_size"]) > 0
    assert result["uv_maps"] and result["active_uv_map"] in result["uv_maps"]
    assert result["base_color_uv_map"] in result["uv_maps"]  # the texture reads a UV map the mesh has
    reopened = result["reopened"]  # the texture is in the saved .blend, not in a temporary file
    assert reopened["verts"] == 2930 and reopened["material"] == "Dreamloom spot"
    assert reopened["base_color_node"] == "TEX_IMAGE" and reopened["base_color_image_packed"]
    assert reopened["image_size"] == result["image_size"] and reopened["uv_maps"] == result["uv_maps"]
