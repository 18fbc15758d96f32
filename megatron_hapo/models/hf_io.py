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
