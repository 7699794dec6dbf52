"""Add-on preferences: where the backend is (LOCAL process or REMOTE address) and its keys.

`backend_mode` and `backend_address` keep these names: scripts and tests set them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import bpy
from bpy.props import EnumProperty, FloatProperty, StringProperty
from bpy.types import AddonPreferences

from .core.local_backend import LocalBackendSettings
from .core.session import ConnectionSettings

ADDON_PACKAGE = __package__
"""The add-on's module name: "bl_ext.<repo>.dreamloom" installed, "blender_addon" from source."""


def data_dir() -> Path:
    """A per-user folder for the job store and the backend log."""
    try:
        return Path(bpy.utils.extension_path_user(ADDON_PACKAGE, path="", create=True))
    except (ValueError, AttributeError):  # run from the source tree, not as an extension
        return Path(tempfile.gettempdir()) / "dreamloom"


class DreamloomPreferences(AddonPreferences):
    """Backend connection settings, shared by every .blend."""

    bl_idname = ADDON_PACKAGE

    backend_mode: EnumProperty(
        name="Backend",
        items=[
            ("LOCAL", "Local", "Start the backend on this computer from a Python environment with torch"),
            ("REMOTE", "Remote", "Connect to a backend already running elsewhere (a GPU box)"),
        ],
        default="LOCAL",
    )
    backend_address: StringProperty(
        name="Address",
        default="tcp://127.0.0.1:5555",
        description="ZeroMQ address of the backend (LOCAL binds it on this computer)",
    )
    server_public_key: StringProperty(
        name="Server Public Key", description="The backend's CurveZMQ public key (Z85); empty on loopback"
    )
    client_keys_dir: StringProperty(
        name="Client Keys", subtype="DIR_PATH", description="Folder with this client's CurveZMQ key pair"
    )
    backend_python: StringProperty(
        name="Python",
        subtype="FILE_PATH",
        default=sys.executable if "python" in Path(sys.executable).name.lower() else "",
        description="Python executable of the environment with the backend's dependencies (torch)",
    )
    backend_project_dir: StringProperty(
        name="Project Folder", subtype="DIR_PATH", description="The Dreamloom project folder (holding backend/)"
    )
    backend_store_dir: StringProperty(
        name="Job Store", subtype="DIR_PATH", description="Where the local backend keeps jobs (empty: the add-on's data folder)"
    )
    backend_models: EnumProperty(
        name="Models",
        items=[
            ("default", "Default", "The real diffusion models (needs a GPU and the weights)"),
            ("tiny", "Tiny", "Tiny random models: runs anywhere, makes no meaningful shape"),
        ],
        default="default",
    )
    backend_device: EnumProperty(
        name="Device",
        items=[("cuda", "CUDA", "Run the pipeline on the GPU"), ("cpu", "CPU", "Run on the CPU (tiny models only, slow)")],
        default="cuda",
    )
    request_timeout: FloatProperty(
        name="Timeout", default=5.0, min=0.5, max=120.0, unit="TIME_ABSOLUTE",
        description="Seconds to wait for the backend's reply before reporting it unreachable",
    )

    def connection(self) -> ConnectionSettings:
        """The client session's settings."""
        remote = self.backend_mode == "REMOTE"
        return ConnectionSettings(
            address=self.backend_address,
            server_public_key=self.server_public_key if remote else "",
            client_keys_dir=bpy.path.abspath(self.client_keys_dir) if remote and self.client_keys_dir else "",
        )

    def local_backend(self) -> LocalBackendSettings:
        """The local backend process's settings."""
        store = self.backend_store_dir or str(data_dir() / "store")
        return LocalBackendSettings(
            python=bpy.path.abspath(self.backend_python),
            project_dir=bpy.path.abspath(self.backend_project_dir),
            address=self.backend_address,
            store_dir=bpy.path.abspath(store),
            models=self.backend_models,
            device=self.backend_device,
        )

    def draw(self, context: bpy.types.Context) -> None:
        from . import runtime

        layout = self.layout
        layout.prop(self, "backend_mode", expand=True)
        layout.prop(self, "backend_address")
        layout.prop(self, "request_timeout")
        if self.backend_mode == "LOCAL":
            box = layout.box()
            box.prop(self, "backend_python")
            box.prop(self, "backend_project_dir")
            box.prop(self, "backend_store_dir")
            box.row().prop(self, "backend_models", expand=True)
            box.row().prop(self, "backend_device", expand=True)
            row = box.row()
            row.operator("dreamloom.start_backend", icon="PLAY")
            row.operator("dreamloom.stop_backend", icon="PAUSE")
            box.label(text=runtime.local_backend_status())
            for line in runtime.local_backend_log(8):
                box.label(text=line[:160])
        else:
            box = layout.box()
            box.prop(self, "server_public_key")
            box.prop(self, "client_keys_dir")
            box.operator("dreamloom.make_client_keys", icon="KEY_HLT")
        layout.operator("dreamloom.test_connection", icon="LINKED")
        for line in runtime.welcome_lines():
            layout.label(text=line)


CLASSES = (DreamloomPreferences,)


def get() -> DreamloomPreferences:
    """This add-on's preferences."""
    return bpy.context.preferences.addons[ADDON_PACKAGE].preferences

