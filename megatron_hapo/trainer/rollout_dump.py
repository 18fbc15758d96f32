"""Rollout dumps: whole groups of a step's responses with every per-token value the step used, for looking
inside a run after the fact (``tools/inspect_rollouts.py`` renders them).

Every ``output.save_rollouts_every`` steps, ``output.save_rollouts_samples`` responses (whole groups of the
trained ones, chosen by a seed of the run and the step, the same on every rank) are written to
``RUN/rollouts/step_000042.jsonl.gz``, one JSON object per response:

- ``step``, ``group`` (the prompt's index among the step's generated prompts), ``sample``, ``reward``,
  ``correct``, ``finish_reason``, ``answer``, ``prompt_ids``, ``response_ids``, ``prompt``, ``response`` (text)
  and ``tokens`` (each response token's text);
- ``values``: one list per quantity, a number per response token (float32 values, written exactly; ``null`` for
  a non-finite one): ``rollout_log_prob`` (the engine's), ``temperature`` (the one it was sampled at),
  ``group_advantage`` (the estimator's, before redistribution), and what the loss used at the token's first
  update (:data:`~megatron_hapo.parallel.policy_loss.RECORDED_VALUES`): ``old_log_prob``, ``entropy`` (of that
  forward), ``h_hat`` (where an ``h_hat`` consumer is configured), ``advantage`` (after redistribution),
  ``eps_low``, ``eps_high``, ``ratio`` and ``loss_mask``.

The loss returns its values only for the micro-batches holding a selected sequence (on the last pipeline stage);
each data-parallel rank fills the rows it trained and one all-reduce over the data-parallel group puts them
together; the first rank of that group (tensor-parallel rank 0) hands them to a writer process that decodes the
text and writes the file (to a temporary name, renamed when complete; :mod:`megatron_hapo.trainer.dump_files`).
A failed write is logged in one line and counted (``rollout_dump_errors``), never fatal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import queue
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_hapo.parallel.collectives import group_rank_size, rows_from_owners
from megatron_hapo.parallel.policy_loss import RECORDED_VALUES, ParallelGroups, PolicyMicroBatch
from megatron_hapo.trainer.dump_files import serve

logger = logging.getLogger(__name__)

#: Where a run's dumps go, under its directory.
DUMP_DIR = "rollouts"
#: How long the end of a run waits for the dumps still being written.
CLOSE_TIMEOUT_S = 300.0
#: Seed offset of the selection (a step's choice depends on ``train.seed`` and the step only).
SELECTION_SEED = 7_919


def dump_path(run_dir: Path, step: int) -> Path:
    """The dump of ``step`` (the metrics row's step index)."""
    return Path(run_dir) / DUMP_DIR / f"step_{step:06d}.jsonl.gz"


def select_rows(keep: torch.Tensor, n: int, samples: int, seed: int) -> torch.Tensor:
    """``[k]`` ascending rows of ``samples // n`` (at least one) whole groups drawn by ``seed`` from the kept ones
    (``keep``: ``[P * n]`` bool, whole groups); fewer when fewer groups were kept."""
    kept = keep.view(-1, n)[:, 0].nonzero().flatten()
    count = min(len(kept), max(1, samples // n))
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))[:count]
    groups = kept[order].sort().values
    return (groups[:, None] * n + torch.arange(n)).flatten()


@dataclass
class ValueRecorder:
    """The loss's per-token values of the selected rows, taken at each row's first update."""

    rows: torch.Tensor
    """``[k]`` the selected rows of the step batch."""
    width: int
    """``L``: the batch's response width."""
    names: tuple[str, ...]
    active: bool = True
    """This rank records (the last pipeline stage's tensor-parallel rank 0; the other ranks of a model replica
    compute the same values, nobody reads theirs)."""
    values: torch.Tensor = field(init=False)
    """``[k, len(names), L]`` float32 (zeros until recorded; on the last pipeline stage)."""
    pending: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.values = torch.zeros(len(self.rows), len(self.names), self.width)
        self.pending = set(self.rows.tolist())

    def mark(self, mbs: list[PolicyMicroBatch], rows_of: list[torch.Tensor]) -> None:
        """Ask the loss of each micro-batch holding a row not recorded yet (``rows_of``: each micro-batch's step
        rows) for its values; those rows count as recorded from now on (every pipeline stage marks alike)."""
        for mb, rows in zip(mbs, rows_of, strict=True):
            wanted = self.pending.intersection(rows.tolist())
            if wanted:
                mb.record_values = self.active
                self.pending -= wanted

    def take(self, outputs: list[dict], slots: list[Any]) -> None:
        """Move the values out of the last stage's loss ``outputs`` (the metrics must be numbers after) into
        :attr:`values` (``slots``: :class:`~megatron_hapo.trainer.microbatch.Slots` of each micro-batch)."""
        position = {int(row): i for i, row in enumerate(self.rows)}
        for out, where in zip(outputs, slots, strict=True):  # one output per micro-batch, in order
            recorded = out.pop("token_values", None)
            if recorded is None:
                continue
            mine = [(j, position[row]) for j, row in enumerate(where.rows.tolist()) if row in position]
            if not mine:
                continue
            read = torch.stack([where.read(recorded[name]) for name in self.names], dim=1)  # [n_mb, F, L_mb]
            local, rows = (torch.tensor(part) for part in zip(*mine, strict=True))
            self.values[rows, :, : read.shape[2]] = read[local]

    def gather(self, groups: ParallelGroups) -> None:
        """Every data-parallel rank's rows in each one (call on the last pipeline stage only)."""
        rows_from_owners(self.values, groups.dp)


def recorded_names(h_hat: bool) -> tuple[str, ...]:
    """The loss's recorded values (``h_hat`` only where a consumer is configured)."""
    return tuple(name for name in RECORDED_VALUES if h_hat or name != "h_hat")


def is_writer(groups: ParallelGroups) -> bool:
    """The rank that writes: the last pipeline stage's first data- and tensor-parallel rank."""
    pp_rank, pp_size = group_rank_size(groups.pp)
    return pp_rank == pp_size - 1 and group_rank_size(groups.dp)[0] == 0 and group_rank_size(groups.tp)[0] == 0


@dataclass
class DumpRecord:
    """One response's dump line before its text is decoded (host memory)."""

    head: dict[str, Any]
    """``step``, ``group``, ``sample``, ``reward``, ``correct``, ``finish_reason``, ``answer``, the ids."""
    values: dict[str, torch.Tensor]
    """``[len(response)]`` each."""

    def task_part(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What the writer process receives: the head (a non-JSON answer as its text) and float32 arrays."""
        head = dict(self.head)
        head["answer"] = json.loads(json.dumps(head.get("answer"), default=str))
        return head, {name: v.detach().float().numpy() for name, v in self.values.items()}


class DumpWriter:
    """A writer process (forkserver, as the verifier workers) that decodes, formats and compresses the dumps, one
    file per step, so that none of that work holds the training process's interpreter lock.

    It never holds the run: :meth:`submit` does not wait (a dump finding ``depth`` still queued, or the process
    dead, is dropped and counted); :meth:`close` waits at most ``timeout_s`` in all, then kills the process and
    counts what it had not written. The process also stops by itself once its parent is gone, and is killed at
    interpreter exit if :meth:`close` never ran (it blocks the stop signals, like every helper of a run, so
    multiprocessing's own SIGTERM at exit would not end it)."""

    def __init__(self, tokenizer: Any = None, depth: int = 2) -> None:
        context = mp.get_context("forkserver")
        self._tasks: Any = context.Queue(maxsize=depth)
        self._results: Any = context.Queue()
        self._failed = 0
        """Writes that failed, dumps dropped and dumps lost with the process."""
        self._reported_failures = 0
        """Failures the process reported (a subset of ``_failed``)."""
        self._submitted = 0
        self._written: list[Path] = []
        self._closed = False
        self._process = context.Process(
            target=serve, args=(self._tasks, self._results, tokenizer), name="rollout-dumps", daemon=True
        )
        self._process.start()
        self._finalizer = weakref.finalize(self, _stop_writer, self._process, self._tasks)

    def submit(self, path: Path, records: list[DumpRecord]) -> None:
        """Queue the dump of one step, or drop it (logged, counted) when the writer is busy or gone."""
        if self._closed or not self._process.is_alive():
            self._failed += 1
            logger.warning("rollout dump %s dropped: the writer process is gone", path)
            return
        try:
            self._tasks.put_nowait((Path(path), [record.task_part() for record in records]))
            self._submitted += 1
        except queue.Full:
            self._failed += 1
            logger.warning("rollout dump %s dropped: the writer is still busy with the previous ones", path)

    @property
    def errors(self) -> int:
        """Failed, dropped and lost dumps so far."""
        self._collect()
        return self._failed

    @property
    def written(self) -> list[Path]:
        """Files written so far."""
        self._collect()
        return list(self._written)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued and stop the process, waiting at most ``timeout_s`` (a hung file system): then it is
        killed and the dumps it had not written are counted."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        if self._process.is_alive():
            with contextlib.suppress(queue.Full):  # a full queue behind a hung writer: killed below
                self._tasks.put(None, timeout=timeout_s)
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.warning("rollout dump writer still busy after %.0f s at the end of the run: killed", timeout_s)
        self._finalizer()  # kills it if alive; never waits on the queue's pipe
        self._collect()
        settled = len(self._written) + self._reported_failures
        self._failed += max(0, self._submitted - settled)  # queued or being written when it stopped: lost
        self._closed = True
        self._results.close()

    def _collect(self) -> None:
        while not self._closed:
            try:
                kind, path, *message = self._results.get_nowait()
            except (queue.Empty, OSError, EOFError):
                return
            if kind == "written":
                self._written.append(Path(path))
            else:
                self._failed += 1
                self._reported_failures += 1
                logger.warning("rollout dump %s not written (%d so far): %s", path, self._failed, message[0])


def _stop_writer(process: Any, tasks: Any) -> None:
    """Kill the writer process if it still runs (bounded), and let the queue's feeder thread go without flushing
    into a pipe nobody reads (else interpreter exit would wait on it forever)."""
    if process.is_alive():
        process.kill()
        process.join(5.0)
    tasks.cancel_join_thread()
    tasks.close()


@dataclass
class RolloutDumps:
    """The run's dumps (``output.save_rollouts_*``): which steps, which rows, and the writer (on one rank)."""

    run_dir: Path
    every: int
    """Every this many steps (0: never)."""
    samples: int = 32
    """Responses per saved step (whole groups)."""
    seed: int = 0
    tokenizer: Any = None
    """Decodes the text (``None``: ids only)."""
    writer: DumpWriter | None = None
    failures: int = 0
    """Dumps that failed before reaching the writer."""

    def due(self, step: int) -> bool:
        """Whether ``step`` (0-based, the metrics row's) is saved."""
        return self.every > 0 and (step + 1) % self.every == 0

    def recorder(
        self, step: int, keep: torch.Tensor, n: int, width: int, *, h_hat: bool, groups: ParallelGroups
    ) -> ValueRecorder | None:
        """The recorder of ``step`` (``None`` when not saved); ``keep``: ``[P * n]`` the trained groups."""
        if not self.due(step) or not bool(keep.any()):
            return None
        rows = select_rows(keep, n, self.samples, self.seed * SELECTION_SEED + step)
        pp_rank, pp_size = group_rank_size(groups.pp)
        active = pp_rank == pp_size - 1 and group_rank_size(groups.tp)[0] == 0
        return ValueRecorder(rows, width, recorded_names(h_hat), active=active)

    def save(self, step: int, recorder: ValueRecorder, generated: Any, batch: Any, groups: ParallelGroups) -> None:
        """Put the recorded rows together and queue their file on the writing rank (every rank calls it).
        ``generated``: the step's :class:`~megatron_hapo.trainer.generation.Generated`; ``batch``: its
        :class:`~megatron_hapo.trainer.batch.StepBatch`."""
        if not recorder.active:
            return
        recorder.gather(groups)  # over the data-parallel group of the recording ranks
        if not is_writer(groups):
            return
        try:  # this rank only: a failure here is counted, never raised (the other ranks go on to the sync)
            if self.writer is None:
                self.writer = DumpWriter(self.tokenizer)
            self.writer.submit(dump_path(self.run_dir, step), _records(step, recorder, generated, batch))
        except Exception as error:  # e.g. a tokenizer that cannot be pickled for the writer process
            self.failures += 1
            logger.warning("rollout dump of step %d not written: %s: %s", step, type(error).__name__, error)

    def errors(self) -> int:
        """Failed writes so far (this rank's)."""
        return self.failures + (0 if self.writer is None else self.writer.errors)

    def close(self) -> None:
        """Finish the queued writes."""
        if self.writer is not None:
            self.writer.close()


def _records(step: int, recorder: ValueRecorder, generated: Any, batch: Any) -> list[DumpRecord]:
    """The dump lines of the recorded rows."""
    n = len(generated.responses) // len(generated.prompts)
    base_temperature = generated.sampling.temperature if generated.sampling is not None else 1.0
    records = []
    for i, row in enumerate(recorder.rows.tolist()):
        response = generated.responses[row]
        length = len(response.token_ids)
        group = row // n
        temperatures = response.temperatures
        if temperatures is None:
            temperatures = torch.full((length,), float(base_temperature))
        head = {
            "step": step,
            "group": group,
            "sample": row % n,
            "reward": float(generated.rewards[row]),
            "correct": bool(generated.correct[row]),
            "finish_reason": response.finish_reason,
            "answer": generated.answers[group],
            "prompt_ids": list(generated.prompts[response.prompt_index]),
            "response_ids": list(response.token_ids),
        }
        values = {
            "rollout_log_prob": batch.rollout_log_prob[row, :length],
            "temperature": temperatures[:length],
            "group_advantage": batch.advantages[row, :length],
        }
        for f, name in enumerate(recorder.names):
            values["loss_mask" if name == "mask" else name] = recorder.values[i, f, :length]
        records.append(DumpRecord(head, values))
    return records


__all__ = [
    "DUMP_DIR",
    "DumpRecord",
    "DumpWriter",
    "RolloutDumps",
    "ValueRecorder",
    "dump_path",
    "is_writer",
    "recorded_names",
    "select_rows",
]
