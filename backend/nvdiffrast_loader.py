"""Lazy loading of nvdiffrast's PyTorch module, with the plugin-import workaround.

nvdiffrast is optional and CUDA-only. Nothing here runs at import of `backend`: call
`load_nvdiffrast()` where the rasteriser is first used.

The PyPI package `diffrp-nvdiffrast` (module `nvdiffrast`, 0.3.3.x) compiles its C++/CUDA plugin
on first use with `torch.utils.cpp_extension.load`. With recent PyTorch the compiled module lands
in the torch-extensions build directory but is not on `sys.path`, so nvdiffrast's own
`importlib.import_module(plugin_name)` fails with `No module named 'nvdiffrast_plugin_...'`. The
fix: compute that build directory the way nvdiffrast names it, put it on `sys.path`, and (if the
first attempt already failed) invalidate the import caches and try once more.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

INSTALL_HINT = (
    "nvdiffrast is not installed. On a machine with an NVIDIA GPU and the CUDA toolkit (nvcc) "
    "run `pip install diffrp-nvdiffrast==0.3.3.1` (or `python build.py setup`, which installs "
    "it when nvidia-smi is present); the plugin compiles on first use. "
    "Set DREAMLOOM_RASTERIZER=torch to use the plain-PyTorch rasteriser instead."
)

_loaded: ModuleType | None = None


class NvdiffrastUnavailable(ImportError):
    """nvdiffrast (or its compiled plugin) cannot be used on this machine."""


def nvdiffrast_installed() -> bool:
    """True when the `nvdiffrast` package can be found (nothing is imported or compiled)."""
    return importlib.util.find_spec("nvdiffrast") is not None


def plugin_build_directory(gl: bool = False) -> str:
    """The torch-extensions directory nvdiffrast compiles its plugin into.

    The name follows nvdiffrast.torch.ops._get_plugin: `nvdiffrast_plugin_<version>_torch<version>`
    sanitised to an identifier; the directory honours TORCH_EXTENSIONS_DIR.
    """
    import nvdiffrast
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from nvdiffrast.torch.ops import sanitize_name

    name = f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}"
    name = sanitize_name(name + ("_gl" if gl else ""))
    return cpp_extension._get_build_directory(name, False)


def _add_wheel_cuda_headers() -> None:
    """Put the CUDA library headers of PyTorch's own `nvidia-*` wheels on CPATH when the toolkit
    lacks them: torch's CUDA headers include cusparse.h, which a toolkit with only nvcc and the
    runtime does not have, while the wheels PyTorch runs on hold it (nvidia/cu13/include/...)."""
    import torch.utils.cpp_extension as cpp_extension

    toolkit = os.path.join(cpp_extension.CUDA_HOME or "", "include", "cusparse.h")
    if os.path.exists(toolkit):
        return
    try:
        import nvidia
    except ImportError:
        return
    found = sorted(str(header.parent) for root in nvidia.__path__ for header in Path(root).glob("*/include/cusparse.h"))
    if found:
        os.environ["CPATH"] = os.pathsep.join([found[0], *filter(None, [os.environ.get("CPATH")])])


def _put_on_sys_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def load_nvdiffrast() -> ModuleType:
    """Import `nvdiffrast.torch`, compile its CUDA plugin if needed, and return the module.

    Raises NvdiffrastUnavailable with install instructions when the package is missing, and with
    the underlying error when the plugin cannot be built or loaded.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    # 1. The package itself.
    if not nvdiffrast_installed():
        raise NvdiffrastUnavailable(INSTALL_HINT)
    try:
        import nvdiffrast.torch as dr
        from nvdiffrast.torch import ops
    except ImportError as error:
        raise NvdiffrastUnavailable(f"importing nvdiffrast.torch failed: {error}. {INSTALL_HINT}") from error
    # 2. The workarounds: the plugin's build directory on sys.path before the first use, and the
    #    wheels' CUDA headers where the toolkit has none.
    _add_wheel_cuda_headers()
    build_dir = plugin_build_directory(gl=False)
    os.makedirs(build_dir, exist_ok=True)
    _put_on_sys_path(build_dir)
    # 3. Compile (first time) and import the plugin; retry once after a fresh directory scan.
    try:
        ops._get_plugin(gl=False)
    except ModuleNotFoundError as first_error:
        if "nvdiffrast_plugin" not in str(first_error):
            raise NvdiffrastUnavailable(f"nvdiffrast plugin import failed: {first_error}") from first_error
        importlib.invalidate_caches()
        try:
            ops._get_plugin(gl=False)
        except ImportError as error:
            raise NvdiffrastUnavailable(
                f"nvdiffrast plugin was built in {build_dir} but cannot be imported: {error}"
            ) from error
    except (RuntimeError, OSError) as error:
        raise NvdiffrastUnavailable(
            f"building the nvdiffrast CUDA plugin failed (needs nvcc and a CUDA toolkit matching "
            f"torch): {error}"
        ) from error
    _loaded = dr
    return dr


def main() -> int:
    """`python -m backend.nvdiffrast_loader`: build (if needed) and load the plugin; print one JSON
    line with its folder and the seconds it took, or one line saying why it cannot."""
    import json
    import time

    started = time.perf_counter()
    if nvdiffrast_installed():  # a build stopped at a time slot's end leaves its lock; none runs now
        lock = Path(plugin_build_directory(gl=False)) / "lock"
        if lock.exists():
            lock.unlink()
            print(f"removed the stale lock {lock}", file=sys.stderr)
    try:
        load_nvdiffrast()
    except NvdiffrastUnavailable as error:
        print(f"python -m backend.nvdiffrast_loader: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"plugin": plugin_build_directory(gl=False), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
