"""The add-on in an artist's hands, in the bpy module against the real servers: the backend
restarting mid-job, Edit Mode, renaming, deleting, two jobs, Refine on several materials,
reference images of every kind, first-run errors, a failed job, bad mesh data.

Each test runs one scenario of tests/addon/blender_driver.py in its own process.
"""

from __future__ import annotations

from pathlib import Path

from tests.addon.test_blender import SHARED, blender, mesh_server  # noqa: F401 (fixtures)
from tests.backend.mesh_runner import ServerProcess

SPOT = SHARED / "meshes" / "spot.obj"
SHORT = "coarse=3,geometry=2,texture=2"
"""Stage, 7 meshes and a final one: a second or so on the mesh-streaming server."""


def test_backend_killed_and_restarted_is_caught_up_without_a_click(addon_zip: Path, tmp_path: Path):
    result = blender("backend_restart", addon_zip, tmp_path, "--save", str(tmp_path), "--steps", "coarse=120",
                     "--timeout", "90", timeout_s=180)
    assert "backend unreachable, retrying" in result["note"]
    assert result["noticed_s"] < 15  # a few heartbeats (2 s each, 3 missed)
    assert result["job_state"] == "done" and result["objects"] == 1
    assert result["last_seq"] == result["object_seq"] > result["seq_at_kill"]
    assert "resum" in result["server_log"].lower() or result["last_seq"] >= 3 + 120 + 1  # the job went on
    assert result["note_after"] == ""


def test_edit_mode_keeps_the_update_until_it_can_be_applied(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("edit_mode", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", SHORT)
    waiting = result["waiting"]
    assert "Edit Mode" in waiting["note"]
    assert waiting["top_z_unchanged"]  # Edit Mode's mesh was not touched
    # Superseded meshes count as applied, the newest waits: dreamloom_seq stops before it.
    assert result["seq_at_edit"] <= waiting["object_seq"] < result["received_seq"]
    assert waiting["state"] == "running" and waiting["problems"] == []  # no pop-up per timer tick
    assert result["job_state"] == "done" and result["note_after"] == "" and result["top_z_changed"]
    assert result["last_seq"] == result["object_seq"] == result["received_seq"]  # the final mesh made it
    assert result["verts"] > 0


def test_a_renamed_object_in_another_collection_keeps_streaming(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("rename", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", SHORT)
    assert result["objects"] == ["My cow"] and result["collections"] == ["Mine"]
    assert result["dreamloom_collection"] == []  # no second object
    assert result["job_state"] == "done" and result["object_seq"] == result["last_seq"]


def test_a_deleted_object_detaches_the_job_and_import_result_brings_it_back(
        addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("delete", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", SHORT)
    assert result["job_state"] == "done" and result["detached"]
    assert result["objects"] == 0 and result["meshes"] == [] and result["orphan_meshes"] == []  # nothing recreated
    assert "Import Result" in result["note"]
    assert result["imported_faces"] == 5856  # spot, from the final GLB
    assert result["imported_collection"] == ["Dreamloom"] and not result["detached_after"]


def test_two_jobs_get_a_row_each_and_cancel_hits_the_running_one(
        addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("two_jobs", addon_zip, tmp_path, "--address", mesh_server.address)
    first, second = result["rows"]
    assert first["title"] == "first cow (running)" and first["running"] and first["status"].startswith("coarse")
    assert second["title"] == "second cow (queued)" and second["status"] == "queued behind 'first cow'"
    assert [first["job_id"], second["job_id"]] == result["job_ids"]
    assert result["second_after_cancel"] != "cancelled"  # Cancel went to the running job
    assert result["states"] == ["cancelled", "cancelled"]


def test_refine_replaces_every_slot_or_the_active_one(addon_zip: Path, tmp_path: Path):
    result = blender("refine_slots", addon_zip, tmp_path, "--mesh", str(SPOT), "--save", str(tmp_path / "slots.blend"))
    every = result["ALL"]
    assert every["slots"] == ["Dreamloom cube ALL"] * 3 and set(every["face_materials"]) == {"Dreamloom cube ALL"}
    active = result["ACTIVE"]
    assert active["slots"] == ["red ACTIVE", "Dreamloom cube ACTIVE", "blue ACTIVE"]
    for name in ("red ALL", "green ALL", "blue ALL", "green ACTIVE"):  # the old looks stay in the file
        assert name in result["materials_after_reopen"]


def test_reference_images_of_every_kind_go_as_png(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("reference_images", addon_zip, tmp_path, "--address", mesh_server.address,
                     "--save", str(tmp_path))
    for name in ("painted", "packed_jpeg", "exr", "webp", "jpeg", "webp_file"):
        assert result[name]["info"] == ["png", 64, 48] and result[name]["note"] == "", name
    assert result["huge_png"]["info"] == ["png", 4096, 164]
    assert "downscaled from 5000x200 to 4096x164" in result["huge_png"]["note"]
    assert result["image_only_job"] == {"state": "done", "prompt": ""}  # no prompt needed with an image


def test_first_run_errors_name_the_real_cause(addon_zip: Path, tmp_path: Path):
    result = blender("first_run", addon_zip, tmp_path, "--local-store", str(tmp_path / "store"), "--timeout", "120",
                     timeout_s=180)
    assert result["no_project"]["field"] == "backend_project_dir" and "Project Folder" in result["no_project"]["message"]
    no_cuda = result["no_cuda"]
    assert no_cuda["field"] == "backend_device" and "no CUDA GPU" in no_cuda["message"]
    assert "--device cpu" in no_cuda["message"]


def test_a_failed_job_is_told_once(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("failed_job", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", SHORT)
    assert result["job_state"] == "failed" and "asked to fail" in result["error"]
    assert result["report"].count("asked to fail") == 1


def test_bad_mesh_events_are_refused_before_bpy(addon_zip: Path, tmp_path: Path):
    result = blender("bad_mesh", addon_zip, tmp_path, "--mesh", str(SPOT))
    assert result["verts"] == [2930] * 4  # the last good mesh stays
    notes = result["notes"]
    assert notes["good"] == ""
    assert "faces" in notes["faces out of range"] and "1000000" in notes["faces out of range"]
    assert "positions" in notes["NaN position"] and "NaN" in notes["NaN position"]
    assert "texture" in notes["texture not a PNG"] and "not a PNG" in notes["texture not a PNG"]
    assert len(result["problems"]) == 3  # one line each
    assert result["mesh_valid"] and result["faces"] == 5856 and result["edges"] == 2930 + 5856 - 2
    assert result["last_seq"] == result["object_seq"] == 4


def test_placement_size_random_seed_detach_and_recall(addon_zip: Path, tmp_path: Path, mesh_server: ServerProcess):
    result = blender("placement", addon_zip, tmp_path, "--address", mesh_server.address, "--steps", SHORT)
    assert result["location"] == [4.0, 5.0, 6.0] and abs(result["size"] - 2.0) < 0.25  # the first mesh is 2 m long
    assert result["drawn_seed"] == result["sent_seed"] != 0
    assert result["copy_job_id"] is None and not result["copy_mesh_shared"]
    assert result["copy_frozen"] and result["original_moved_on"] and result["job_state"] == "done"
    assert result["recalled"] == ["a spot cow", result["drawn_seed"], "draft"]
