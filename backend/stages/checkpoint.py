"""The pipeline's checkpoint format: one safetensors blob, held as bytes.

A checkpoint holds everything needed to continue a job where it stopped: the stage and the next
step to run, the state dicts of the modules being optimised (and of the ones the stage was built
from), the optimisers' states, extra tensors (a fixed mesh, UVs), and the random state of torch
(CPU and CUDA), numpy and Python. The server keeps the bytes in its store; the CLI writes them
to `OUT/checkpoint.pt`.

Loading a checkpoint cannot run code (unlike a pickle, which `torch.save` writes): the tensors
are safetensors entries named "0", "1", ..., and everything else is one JSON tree in the
safetensors metadata, where a tensor is `{"__tensor__": "3"}`, a numpy array
`{"__ndarray__": [dtype, shape, base64]}`, a tuple `{"__tuple__": [...]}`, bytes
`{"__bytes__": base64}` and a map whose keys are not all plain strings `{"__items__": [[k, v]...]}`
(optimiser states are keyed by parameter number).
"""

from __future__ import annotations

import base64
import json
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.torch
import torch

FORMAT_VERSION = 3
"""Bumped whenever the layout below (or a module's state) changes; another version's blob is
refused with `OtherFormat`, and a job resuming from one starts afresh."""


class OtherFormat(ValueError):
    """A checkpoint written by another release (another `FORMAT_VERSION`)."""


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


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """`value` as a JSON tree (module docstring), its tensors moved to the CPU into `tensors`."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # own storage: no shared views
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"__ndarray__": [array.dtype.str, list(array.shape), base64.b64encode(array.tobytes()).decode("ascii")]}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{path}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {"__items__": [[_encode(key, tensors, path), _encode(item, tensors, f"{path}.{key}")]
                              for key, item in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: {path} is a {type(value).__name__}, which the checkpoint format cannot hold")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            return tensors[inner]
        if tag == "__ndarray__":
            dtype, shape, data = inner
            return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
        if tag == "__bytes__":
            return base64.b64decode(inner)
        if tag == "__tuple__":
            return tuple(_decode(item, tensors) for item in inner)
        if tag == "__items__":
            return {_decode(key, tensors): _decode(item, tensors) for key, item in inner}
    return {key: _decode(item, tensors) for key, item in value.items()}


def to_bytes(checkpoint: Checkpoint) -> bytes:
    """Serialise a checkpoint (tensors moved to the CPU)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode({
        "format": FORMAT_VERSION,
        "stage": checkpoint.stage,
        "step": int(checkpoint.step),
        "modules": checkpoint.modules,
        "optimisers": checkpoint.optimisers,
        "tensors": checkpoint.tensors,
        "rng": checkpoint.rng,
        "job_key": checkpoint.job_key,
    }, tensors, "checkpoint")
    return safetensors.torch.save(tensors, metadata={"dreamloom": json.dumps(tree)})


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` map of a safetensors blob (8-byte little-endian header length, JSON)."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError(f"the header claims {length} bytes, the blob has {len(data) - 8}")
    header = json.loads(data[8: 8 + length])
    return header.get("__metadata__") or {} if isinstance(header, dict) else {}


def from_bytes(data: bytes) -> Checkpoint:
    """Load a checkpoint written by `to_bytes`; a bad blob raises ValueError naming what is off."""
    try:
        tensors = safetensors.torch.load(bytes(data))
        blob = _decode(json.loads(_metadata(data)["dreamloom"]), tensors)
    except Exception as exc:  # a truncated or foreign blob: several exception types
        raise ValueError(f"checkpoint: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise OtherFormat(f"checkpoint: format {found!r} is not {FORMAT_VERSION}")
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
        """Role -> adapter name; none for a prior without weights to adapt (an oracle)."""
        names = {"dreambooth": self.bsd.dreambooth, "vsd": self.bsd.vsd}
        return {role: name for role, name in names.items() if name in self.bsd.optimizers}

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
