"""Dreamloom for Blender: prompt and reference image to an editable, textured mesh.

The bpy-free core lives in `core/`; this package's other modules are the thin Blender layer.
Importing this file imports no bpy, so `blender_addon.core` is usable (and tested) without
Blender; `register()` imports the Blender layer.
"""

from __future__ import annotations

PYTHONS = ("3.11", "3.13")
"""The Pythons the extension bundles pyzmq and msgpack wheels for (`build.py addon` reads this):
3.11 is Blender 4.2 to 5.0's, 3.13 is Blender 5.1 and later's."""


def unsupported() -> str | None:
    """Why this Blender cannot run the add-on (its bundled wheels do not fit its Python), or None."""
    import sys

    import bpy

    try:
        import msgpack  # noqa: F401  (the bundled wheels Blender installed for this Python)
        import zmq  # noqa: F401
    except ImportError as exc:
        python = ".".join(str(part) for part in sys.version_info[:2])
        return (f"Dreamloom cannot start in Blender {bpy.app.version_string} (Python {python}): no module "
                f"{exc.name}; this build's pyzmq and msgpack wheels are for Python {' and '.join(PYTHONS)} "
                f"(Blender 4.2 to 5.x); install a Dreamloom zip made for this Blender")
    return None


def _classes() -> tuple[type, ...]:
    """Every class the add-on registers, in registration order."""
    from . import operators, panels, preferences, properties

    return (*properties.CLASSES, *preferences.CLASSES, *operators.CLASSES, *panels.CLASSES)


def _on_load_post(_filepath: str = "") -> None:
    """After a .blend is opened: re-attach its unfinished jobs on the next pump."""
    from . import runtime

    runtime.close_session()


def pump() -> int:
    """Apply what the backend sent (what the timer does; call it from scripts to pump by hand)."""
    from . import runtime

    return runtime.pump()


def register() -> None:
    if (problem := unsupported()) is not None:
        raise RuntimeError(problem)  # before anything registers; Blender reports this one line
    import bpy

    from . import operators, properties, runtime

    for cls in _classes():
        bpy.utils.register_class(cls)
    properties.attach()
    bpy.app.handlers.load_post.append(bpy.app.handlers.persistent(_on_load_post))
    runtime.STATE.reattach_needed = True
    operators.ensure_timer()


def unregister() -> None:
    import bpy

    from . import properties, runtime

    if bpy.app.timers.is_registered(runtime.timer):
        bpy.app.timers.unregister(runtime.timer)
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    runtime.stop_local_backend()
    runtime.close_session()
    runtime.STATE.queue.close()
    properties.detach()
    for cls in reversed(_classes()):
        bpy.utils.unregister_class(cls)
