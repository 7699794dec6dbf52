"""The guidance benchmark runs end to end on the CPU with the tiny models (its numbers are not checked)."""

from __future__ import annotations

import json

import pytest

from backend.guidance import bench


def test_tiny_bench_prints_one_json_object(capsys, tmp_path, monkeypatch, tiny_folder):
    from backend.guidance.tiny import TINY_VERSION

    cached = tmp_path / f"models-{TINY_VERSION}"  # the session's tiny build, as the cache holds it
    cached.mkdir()
    for role in ("prior2d", "zero123", "depth", "matting"):
        (cached / role).symlink_to(tiny_folder / role)
    (cached / "complete").write_text(TINY_VERSION)
    monkeypatch.setenv("DREAMLOOM_CACHE_DIR", str(tmp_path))
    bench.main(["--device", "cpu", "--tiny", "--render-res", "32", "--warmup", "0", "--repeats", "1",
                "--restore-steps", "1", "--lora-rank", "2"])
    result = json.loads(capsys.readouterr().out)
    assert result["models"] == "tiny" and result["device"] == "cpu" and result["render_res"] == 32
    for key in ("hybrid_step_ms", "bsd_step_ms", "bsd_round_ms"):
        assert result[key] > 0
    assert result["hybrid_peak_mib"] is None


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--tiny", "--dtype", "float16"])
    assert "--dtype applies to the full-size models only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
