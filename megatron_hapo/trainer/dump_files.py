"""Writing rollout dump files, in the writer process (:class:`~megatron_hapo.trainer.rollout_dump.DumpWriter`).

This module uses only numpy and the standard library (the process that runs :func:`serve` touches no CUDA), and
its work (decoding the text, formatting every float, compressing) never holds the training process's interpreter
lock. (The forkserver still imports the run's main module once, and unpickling a tokenizer imports its library.)
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import queue
from pathlib import Path
from typing import Any

import numpy as np

#: ``(path, [(head, {name: float32 array})])``: one step's dump as the writer process receives it.
DumpTask = tuple[Path, list[tuple[dict[str, Any], dict[str, np.ndarray]]]]


def float_list(values: np.ndarray) -> str:
    """``[n]`` values -> a JSON list of their float32 values, each the shortest text that reads back exactly
    (``null`` where non-finite)."""
    values = np.asarray(values, dtype=np.float32)
    text = values.astype(str)
    text[~np.isfinite(values)] = "null"
    return "[" + ",".join(text.tolist()) + "]"


def json_line(head: dict[str, Any], values: dict[str, np.ndarray], tokenizer: Any) -> str:
    """One response's line: ``head``, its text decoded by ``tokenizer`` (if any), then ``"values"``."""
    head = dict(head)
    if tokenizer is not None:
        prompt, response = head["prompt_ids"], head["response_ids"]
        head["prompt"] = tokenizer.decode(prompt, skip_special_tokens=False)
        head["response"] = tokenizer.decode(response, skip_special_tokens=False)
        head["tokens"] = tokenizer.batch_decode([[t] for t in response], skip_special_tokens=False)
    body = json.dumps(head, default=str)[:-1]  # an answer of any type
    lists = ", ".join(f'"{name}": {float_list(v)}' for name, v in values.items())
    return f'{body}, "values": {{{lists}}}}}\n'


def write_dump(task: DumpTask, tokenizer: Any) -> None:
    """Write one step's file under a temporary name, renamed when complete."""
    path, records = task
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with gzip.open(partial, "wt", encoding="utf-8", compresslevel=6) as out:
        for head, values in records:
            out.write(json_line(head, values, tokenizer))
    os.replace(partial, path)


def serve(tasks: Any, results: Any, tokenizer: Any) -> None:
    """The writer process: write each task, report ``("written", path)`` or ``("error", path, message)``; stop on
    ``None`` or when the process that started it is gone."""
    parent = mp.parent_process()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if task is None:
            return
        try:
            write_dump(task, tokenizer)
            results.put(("written", str(task[0])))
        except Exception as error:  # a dump is never fatal to the run: reported and counted
            results.put(("error", str(task[0]), f"{type(error).__name__}: {error}"))


__all__ = ["DumpTask", "float_list", "json_line", "serve", "write_dump"]
