"""Where the wire protocol comes from.

Inside the installed extension, `build.py addon` vendors a copy of the project's `protocol/`
package as `<extension>/protocol`, imported relatively. Run from the source tree (tests, the
demo), that copy does not exist and the top-level `protocol` package is used instead.
"""

from __future__ import annotations

import importlib
import importlib.util

_ADDON_PACKAGE = __package__.rsplit(".", 1)[0]  # "blender_addon" or "bl_ext.<repo>.dreamloom"


def _protocol_package() -> str:
    """The importable name of the protocol package: the vendored copy when it is there."""
    vendored = f"{_ADDON_PACKAGE}.protocol"
    if importlib.util.find_spec(vendored) is not None:
        return vendored
    return "protocol"


PROTOCOL_PACKAGE = _protocol_package()
messages = importlib.import_module(f"{PROTOCOL_PACKAGE}.messages")
codec = importlib.import_module(f"{PROTOCOL_PACKAGE}.codec")
params = importlib.import_module(f"{PROTOCOL_PACKAGE}.params")
transport = importlib.import_module(f"{PROTOCOL_PACKAGE}.transport")
keys = importlib.import_module(f"{PROTOCOL_PACKAGE}.keys")

Message = messages.Message
ProtocolError = codec.ProtocolError
zmq_error = importlib.import_module("zmq").ZMQError
