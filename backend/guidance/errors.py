"""Errors raised by the guidance package.

    ModelLoadError(role, source, message)       weights missing, gated, unreachable or malformed
    GuidanceInputError(field, message)          a prompt or reference image that cannot be used

Both carry a one-sentence message meant to be shown to the user as is (no traceback needed).
"""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A guidance model could not be loaded.

    The message names the model, where it was looked for and how to provide it.
    """

    def __init__(self, role: str, source: str, message: str) -> None:
        super().__init__(message)
        self.role = role
        """The model role: "prior2d", "zero123", "depth", "matting" or "texture"."""
        self.source = source
        """The Hugging Face id or local folder that was asked for."""


class GuidanceInputError(ValueError):
    """A user input (prompt, reference image) is unusable; raised before any GPU work."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        """The input field at fault, e.g. "prompt" or "image"."""
        self.message = message
        """What is wrong with it, naming the bad value."""
