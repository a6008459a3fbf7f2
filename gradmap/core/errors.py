"""Exceptions raised for bad user input; messages name the problem and the fix."""

__all__ = ["GradmapError", "UnsupportedModelError"]


class GradmapError(ValueError):
    """Bad input to a gradmap function (the model and files are left untouched)."""


class UnsupportedModelError(GradmapError):
    """The model's architecture has no adapter entry."""
