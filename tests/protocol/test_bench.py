"""The benchmark script runs end to end (tiny sizes) and prints every measurement."""

from __future__ import annotations

from protocol import bench


def test_bench_runs_with_tiny_sizes(capsys) -> None:
    assert bench.main(["--vertices", "1000", "--pings", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["encode", "decode", "ping", "mesh"]
    assert "MB/s" in lines[-1]
