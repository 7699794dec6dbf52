"""Pieces of the generation pipeline that `backend.pipeline` strings together: the checkpoint
format, the streaming of meshes and previews, and the per-stage loss helpers."""
