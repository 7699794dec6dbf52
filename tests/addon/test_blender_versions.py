"""The extension fits every Blender from 4.2 on: wheels for both Pythons on every platform, a
manifest Blender's own strict validator accepts, a build that refuses to make a half-installable
zip, and a one-line report where the bundled wheels do not fit.

The validator is blender_ext.py from each tested Blender's bpy module (bl_pkg/cli), run on the zip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.addon.blenders import BLENDERS, BUILD, Blender
from tests.addon.test_blender import blender

EXPECTED_WHEELS = {
    ("linux-x64", "3.11"): ["msgpack-1.2.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
                            "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl"],
    ("linux-x64", "3.13"): ["msgpack-1.2.4-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
                            "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl"],
    ("windows-x64", "3.11"): ["msgpack-1.2.4-cp311-cp311-win_amd64.whl", "pyzmq-27.3.0-cp311-cp311-win_amd64.whl"],
    ("windows-x64", "3.13"): ["msgpack-1.2.4-cp313-cp313-win_amd64.whl", "pyzmq-27.3.0-cp312-abi3-win_amd64.whl"],
    ("macos-arm64", "3.11"): ["msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64.whl",
                              "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl"],
    ("macos-arm64", "3.13"): ["msgpack-1.2.4-cp313-cp313-macosx_11_0_arm64.whl",
                              "pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl"],
    ("macos-x64", "3.11"): ["msgpack-1.2.4-cp311-cp311-macosx_10_9_x86_64.whl",
                            "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl"],
    ("macos-x64", "3.13"): ["msgpack-1.2.4-cp313-cp313-macosx_10_13_x86_64.whl",
                            "pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl"],
}
"""(Blender platform, Python) -> the wheels Blender installs there (pyzmq's cp312-abi3 wheel
serves 3.12 and later; its universal2 wheels serve both Macs)."""


def manifest_of(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as zipped:
        return tomllib.loads(zipped.read("blender_manifest.toml").decode())


def test_the_zip_holds_both_pythons_wheels_for_every_platform(built_zip: Path):
    manifest = manifest_of(built_zip)
    listed = [w.removeprefix("./wheels/") for w in manifest["wheels"]]
    with zipfile.ZipFile(built_zip) as zipped:
        assert sorted(n.removeprefix("wheels/") for n in zipped.namelist() if n.startswith("wheels/")) == sorted(listed)
    assert sorted(set(sum(EXPECTED_WHEELS.values(), []))) == sorted(listed)
    assert sorted(manifest["platforms"]) == sorted({platform for platform, _ in EXPECTED_WHEELS})
    for (platform, python), expected in EXPECTED_WHEELS.items():
        fits = [w for w in listed if any(BUILD.wheel_fits(w, r, BUILD.WHEEL_PLATFORMS[platform], python)
                                         for r in BUILD.ADDON_WHEELS)]
        assert sorted(fits) == expected, (platform, python)
    assert manifest["blender_version_min"] == "4.2.0" and "blender_version_max" not in manifest


def test_blenders_own_strict_validator_accepts_the_zip(built_zip: Path, blender_python: Path):
    validator = BUILD.blender_validator(blender_python)
    check = subprocess.run([str(blender_python), str(validator), "validate", str(built_zip)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f'Success parsing TOML in "{built_zip}"' in check.stdout


def test_each_run_is_the_pinned_blender(tested_blender: Blender, blender_python: Path):
    report = subprocess.run([str(blender_python), "-c", "import bpy, sys; print(bpy.app.version_string, "
                             "'%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, check=True)
    version, python = report.stdout.split()[0], report.stdout.split()[-1]
    assert (f"bpy=={version}", python) == (tested_blender.pin, tested_blender.python_version)
    assert [b.pin for b in BLENDERS] == ["bpy==5.0.1", "bpy==5.2.3"]


@pytest.mark.parametrize("field, line, bad_line", [
    ("network", 'network = "Talk to the Dreamloom backend over ZeroMQ, local or remote"',
     'network = "Talk to the Dreamloom backend (ZeroMQ) on this computer or a remote GPU box"'),
    ("tagline", 'tagline = "Prompt and reference image to an editable, textured 3D mesh"',
     'tagline = "Prompt and reference image to an editable, textured 3D mesh."'),
], ids=["network", "tagline"])
def test_a_field_blender_refuses_fails_the_build_naming_it(built_zip: Path, tmp_path: Path, field: str, line: str,
                                                           bad_line: str):
    source = tmp_path / "blender_addon"
    shutil.copytree(BUILD.ADDON_SOURCE, source, ignore=shutil.ignore_patterns(*BUILD.ADDON_EXCLUDE))
    manifest = source / "blender_manifest.toml"
    assert line in manifest.read_text()
    manifest.write_text(manifest.read_text().replace(line, bad_line))
    with pytest.raises(SystemExit) as refused:
        BUILD.build_addon(Path(sys.executable), source=source, out=tmp_path)
    message = str(refused.value)
    assert "\n" not in message and f'"{field}"' in message and "Blender refuses dreamloom-0.1.0.zip" in message
    assert not list((tmp_path / "dist").glob("*.zip"))  # no zip Blender would half-install


def test_a_platform_without_its_wheels_fails_the_build_naming_it(built_zip: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "whl"
    shutil.copytree(BUILD.WHEEL_CACHE, cache)
    for wheel in (cache / "windows-x64").glob("msgpack-*-cp313-*.whl"):
        wheel.unlink()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip cannot fetch it either
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as refused:
        BUILD.addon_wheels(Path(sys.executable), BUILD.addon_pythons(), cache=cache)
    message = str(refused.value)
    assert "\n" not in message
    assert re.match(r"build\.py: no msgpack==1\.2\.4 wheel for Python 3\.13 on windows-x64 \(pip download: .+\)$", message)


def test_an_extension_whose_wheels_do_not_fit_says_so_in_one_line_on_enable(addon_zip: Path, tmp_path: Path,
                                                                             blender_python: Path):
    if subprocess.run([str(blender_python), "-c", "import zmq, msgpack"], capture_output=True).returncode == 0:
        pytest.skip(f"{blender_python} has pyzmq and msgpack of its own (for the backend): "
                    "the add-on finds them even without its wheels")
    result = blender("wheels_missing", addon_zip, tmp_path)
    assert result["installed"] and not result["enabled"] and not result["panel_registered"]
    message = result["message"].strip()
    assert "\n" not in message
    assert message == (f"Error: Dreamloom cannot start in Blender {result['blender']} (Python {result['python']}): "
                       "no module msgpack; this build's pyzmq and msgpack wheels are for Python 3.11 and 3.13 "
                       "(Blender 4.2 to 5.x); install a Dreamloom zip made for this Blender")


def test_find_python_asks_each_candidate_its_version():
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = BUILD.find_python(this)
    check = subprocess.run([str(found), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=True)
    assert check.stdout.strip() == this
    assert BUILD.find_python("3.99") is None  # a version no interpreter here has (a pyenv shim would answer wrongly)
