"""Read a Hugging Face safetensors checkpoint tensor by tensor (never the whole model in memory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class HFCheckpoint:
    """Lazy name -> tensor access to ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.model_dir / file for name, file in weight_map.items()}
        elif (self.model_dir / "model.safetensors").is_file():
            path = self.model_dir / "model.safetensors"
            with safe_open(path, framework="pt") as handle:
                self._files = dict.fromkeys(handle.keys(), path)
        else:
            raise FileNotFoundError(f"{self.model_dir} has neither model.safetensors nor its sharded index")

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (``KeyError`` when absent)."""
        with safe_open(self._files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be read whole (``None``: it can): its 8-byte header length, its
    JSON header and the data every tensor's offsets point at, checked without reading any tensor."""
    size = path.stat().st_size
    if size < 8:
        return f"{path}: {size} bytes, not a safetensors file (truncated?)"
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if 8 + length > size:
            return f"{path}: its header claims {length} bytes but the file has {size}: truncated"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return f"{path}: unreadable safetensors header"
    if not isinstance(header, dict):
        return f"{path}: unreadable safetensors header"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if ends and 8 + length + max(ends) > size:
        return f"{path}: truncated ({size} bytes, its tensors need {8 + length + max(ends)})"
    return None


def check_hf_weights(model_dir: str | Path) -> str | None:
    """Why the safetensors weights of the HF directory ``model_dir`` cannot be read (``None``: they can): no
    weights, an index naming a missing shard, a truncated or unreadable file. Reads headers only."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index}: unreadable index (a weight_map of tensor -> shard file is expected)"
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            return f"{index} names {len(missing)} missing shard(s): {', '.join(missing[:3])}"
        paths = [model_dir / f for f in files]
    elif (model_dir / "model.safetensors").is_file():
        paths = [model_dir / "model.safetensors"]
    else:
        return f"{model_dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)"
    return next((problem for path in paths if (problem := _safetensors_problem(path))), None)


def hf_tensor_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of an HF directory's safetensors, from their headers (no tensor is read)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [model_dir / "model.safetensors"]
    )
    shapes: dict[str, list[int]] = {}
    for path in files:
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    return shapes


def config_weights_mismatch(model_dir: str | Path, config: dict) -> str | None:
    """How the weights of ``model_dir`` disagree with its ``config.json`` (``config``): the embedding's
    vocabulary x hidden size, the number of layers; ``None`` when they agree (or the names are not Llama /
    Qwen's). Call it after :func:`check_hf_weights` passed."""
    text = config.get("text_config", config)
    shapes = hf_tensor_shapes(model_dir)
    embed = shapes.get("model.embed_tokens.weight")
    expected = [text.get("vocab_size"), text.get("hidden_size")]
    if embed is not None and embed != expected:
        return (
            f"config.json says vocabulary x hidden {expected[0]} x {expected[1]}, but model.embed_tokens.weight is "
            f"{embed[0]} x {embed[1]}: the config and the weights are of different models"
        )
    layers = {int(name.split(".")[2]) for name in shapes if name.startswith("model.layers.")}
    if layers and len(layers) != text.get("num_hidden_layers"):
        return f"config.json says {text.get('num_hidden_layers')} layers, the weights hold {len(layers)}"
    return None
