"""The pipeline's checkpoint format: one `torch.save` blob, held as bytes.

A checkpoint holds everything needed to continue a job where it stopped: the stage and the next
step to run, the state dicts of the modules being optimised (and of the ones the stage was built
from), the optimisers' states, extra tensors (a fixed mesh, UVs), and the random state of torch
(CPU and CUDA), numpy and Python. The server keeps the bytes in its store; the CLI writes them
to `OUT/checkpoint.pt`.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 2
"""Bumped whenever the layout below changes; an older blob is refused with a clear message."""


@dataclass
class Checkpoint:
    """One resumable point of a job."""

    stage: str
    """The stage to continue: "coarse", "geometry" or "texture"."""
    step: int
    """The next step to run in that stage (0 = the stage start)."""
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Module name -> state dict (e.g. "neus", "dmtet", "color", "lora")."""
    optimisers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Optimiser name -> optimiser state dict."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Plain tensors a stage needs (e.g. the fixed mesh "verts_vx3", "faces_fx3", "uvs_vx2")."""
    rng: dict[str, Any] = field(default_factory=dict)
    """Random states: "torch", "cuda" (list, may be empty), "numpy", "python", "generators"."""
    job_key: str = ""
    """A digest of the job's kind and params; a checkpoint of another job is refused."""


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The random state of every source the pipeline draws from: torch (CPU, CUDA), numpy,
    Python, and the job's own generators by name."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back the random state `capture_rng` took (generators matched by name)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name in saved:
            generator.set_state(saved[name])


def _to_cpu(value: Any) -> Any:
    """The same nested structure with every tensor moved to the CPU (so a blob loads anywhere)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def to_bytes(checkpoint: Checkpoint) -> bytes:
    """Serialise a checkpoint (tensors moved to the CPU)."""
    blob = {
        "format": FORMAT_VERSION,
        "stage": checkpoint.stage,
        "step": int(checkpoint.step),
        "modules": _to_cpu(checkpoint.modules),
        "optimisers": _to_cpu(checkpoint.optimisers),
        "tensors": _to_cpu(checkpoint.tensors),
        "rng": checkpoint.rng,
        "job_key": checkpoint.job_key,
    }
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Checkpoint:
    """Load a checkpoint written by `to_bytes`; a bad blob raises ValueError naming what is off."""
    try:
        # weights_only=False: the blob holds numpy/python RNG state, and it is our own file.
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint: cannot be read ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"checkpoint: format {found!r} is not {FORMAT_VERSION}")
    return Checkpoint(
        stage=blob["stage"],
        step=blob["step"],
        modules=blob["modules"],
        optimisers=blob["optimisers"],
        tensors=blob["tensors"],
        rng=blob["rng"],
        job_key=blob.get("job_key", ""),
    )


class BSDState:
    """`state_dict` / `load_state_dict` for a `backend.guidance.bsd.BSD`: both LoRAs' weights,
    their camera MLPs, optimisers and gradient scalers, keyed by role ("dreambooth", "vsd")
    because adapter names differ from one BSD instance to the next, and the cache of restored
    renders."""

    def __init__(self, bsd: Any) -> None:
        self.bsd = bsd

    def _adapters(self) -> dict[str, str]:
        return {"dreambooth": self.bsd.dreambooth, "vsd": self.bsd.vsd}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for role, adapter in self._adapters().items():
            state[role] = {
                "lora": [param.detach().clone() for param in self.bsd.lora_parameters(adapter)],
                "camera": self.bsd.cameras[adapter].state_dict(),
                "optimizer": self.bsd.optimizers[adapter].state_dict(),
                "scaler": self.bsd.scalers[adapter].state_dict(),
            }
        state["cache"] = [(x0.detach().clone(), c2w.detach().clone()) for x0, c2w in self.bsd.cache]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for role, adapter in self._adapters().items():
            params = self.bsd.lora_parameters(adapter)
            saved = state[role]["lora"]
            if len(saved) != len(params):
                raise ValueError(f"checkpoint: BSD {role} LoRA has {len(saved)} tensors, expected {len(params)}")
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value.to(param.device, param.dtype))
            self.bsd.cameras[adapter].load_state_dict(state[role]["camera"])
            self.bsd.optimizers[adapter].load_state_dict(state[role]["optimizer"])
            self.bsd.scalers[adapter].load_state_dict(state[role]["scaler"])
        device = self.bsd.prior.device
        self.bsd.cache = [(x0.to(device), c2w.to(device)) for x0, c2w in state["cache"]]
