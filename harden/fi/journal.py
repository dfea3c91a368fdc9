"""The campaign JSONL file: a header, then each shard's records followed by its completion marker.

A shard's lines and its marker go out in one write and are flushed together
(into the OS, which keeps them when the process is killed; the file is fsynced
when the campaign closes), so after a kill -9 the file is a run of complete shards, possibly
followed by part of one. Reopening truncates that tail and reports which shards
are done; they are never rerun, and none is written twice.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harden.errors import HardenError
from harden.files import atomic_open


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once: a line per fault is encoded


def dumps(obj: dict[str, Any]) -> str:
    """One compact JSON line; the same object always gives the same bytes."""
    return _ENCODER.encode(obj)


def num(x: float) -> float | str:
    """A float for JSON, with NaN and ±Inf as the strings 'nan', 'inf', '-inf' (strict JSON has none)."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def unnum(x: float | str) -> float:
    return float(x)


_FAULT = '{"type":"fault",'


@dataclass(frozen=True)
class EvalHeader:
    """The header's record of a campaign's evaluation set: what certify and summaries read back.

    `ids` are the kept images' indices in the loaded dataset (in campaign order),
    `top2diff` their fault-free Top2Diff, `ranges` the profiled max |activation|
    per tensor. `to_dict` is the exact header form, so a resumed campaign's
    header compares equal byte for byte.
    """

    total: int
    correct: int
    ids: list[int]
    top2diff: list[float]
    ranges: dict[str, float]
    probabilities: bool = False

    @property
    def kept(self) -> int:
        return len(self.ids)

    def top2diff_by_image(self) -> dict[int, float]:
        """Dataset index → fault-free Top2Diff of each kept image."""
        return dict(zip(self.ids, self.top2diff))

    def to_dict(self) -> dict[str, object]:
        return {"total": self.total, "correct": self.correct, "kept": self.kept,
                "scores": "probabilities" if self.probabilities else "logits",
                "ids": list(self.ids), "top2diff": list(self.top2diff), "ranges": dict(self.ranges)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalHeader:
        return cls(int(data["total"]), int(data["correct"]), [int(i) for i in data["ids"]],
                   [float(t) for t in data["top2diff"]], dict(data.get("ranges", {})),
                   data.get("scores") == "probabilities")


class JournalContents:
    """A parsed journal: header, complete shards (index → record lines) and where the valid part ends."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise HardenError(f"{path}: no such campaign file")
        self.header: dict[str, Any] = {}
        self.shards: dict[int, list[str]] = {}
        self.markers: dict[int, str] = {}
        self.end = 0
        pending: list[str] = []
        offset = 0
        with open(self.path, "rb") as handle:
            for raw in handle:
                offset += len(raw)
                if not raw.endswith(b"\n"):
                    break
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if self.header and line.startswith(_FAULT):
                    pending.append(line)  # whole lines are only ever written whole; parsed when summarised
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    break
                kind = obj.get("type") if isinstance(obj, dict) else None
                if not self.header:
                    if kind != "header":
                        raise HardenError(f"{path}: not a harden campaign file (no header line)")
                    self.header = obj
                    self.end = offset
                elif kind == "fault":
                    pending.append(line)
                elif kind == "shard" and obj.get("count") == len(pending) and obj["shard"] not in self.shards:
                    self.shards[int(obj["shard"])] = pending
                    self.markers[int(obj["shard"])] = line
                    pending = []
                    self.end = offset
                else:
                    break
        if not self.header:
            raise HardenError(f"{path}: empty or unreadable campaign file")

    @property
    def evaluation(self) -> EvalHeader:
        """The evaluation set the header records (kept image ids, their Top2Diff, profiled ranges)."""
        return EvalHeader.from_dict(self.header["eval"])

    def records(self) -> Iterable[dict[str, Any]]:
        """Every fault record of the complete shards, in shard order."""
        for idx in sorted(self.shards):
            for line in self.shards[idx]:
                yield json.loads(line)


class Journal:
    """Appends shards to a campaign file, resuming it when its header matches."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any], fresh: bool = False) -> None:
        """Open `path` for this campaign, holding an exclusive lock on it until `close`.

        Two campaigns writing one file would interleave their shards, so a
        second writer is refused instead of corrupting the first one's file.
        """
        self.path = Path(path)
        self.done: set[int] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), "r+b")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise HardenError(f"{path} is being written by another running campaign; wait for it to finish "
                              "or choose another output") from None
        try:
            self._start(header, fresh)
        except BaseException:
            self.handle.close()
            raise

    def _start(self, header: dict[str, Any], fresh: bool) -> None:
        """Resume the file when it holds this campaign; else write the header to an empty one."""
        if os.fstat(self.handle.fileno()).st_size and not fresh:
            contents = JournalContents(self.path)
            if dumps(contents.header) != dumps(header):
                raise HardenError(f"{self.path} holds a different campaign (model, data or config differ); "
                                  "choose another output or pass --fresh to start over")
            self.done = set(contents.shards)
            self.handle.truncate(contents.end)
        else:
            self.handle.truncate(0)
            self.handle.write((dumps(header) + "\n").encode())
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.handle.seek(0, os.SEEK_END)

    def append(self, shard: int, site: str, records: Sequence[dict[str, Any]]) -> None:
        """Write one shard's records and its marker together, durably."""
        lines = [dumps(r) for r in records]
        lines.append(dumps({"type": "shard", "shard": shard, "site": site, "count": len(records)}))
        self.handle.write(("\n".join(lines) + "\n").encode())
        self.handle.flush()
        self.done.add(shard)

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def merge_journals(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> JournalContents:
    """Join the parts of a `--shard i/n` campaign into one file, identical to an unsharded run's.

    The parts must share everything but their shard setting, and together hold
    every shard exactly once.
    """
    if not paths:
        raise HardenError("nothing to merge")
    parts = [JournalContents(p) for p in paths]
    base = dict(parts[0].header)
    base["config"] = {**base["config"], "shard": None}
    shards: dict[int, tuple[list[str], str]] = {}
    for part in parts:
        header = dict(part.header)
        header["config"] = {**header["config"], "shard": None}
        if dumps(header) != dumps(base):
            raise HardenError(f"{part.path} belongs to a different campaign than {parts[0].path}")
        for idx, lines in part.shards.items():
            if idx in shards:
                raise HardenError(f"shard {idx} appears in more than one part ({part.path})")
            shards[idx] = (lines, part.markers[idx])
    total = int(base["total_shards"])
    missing = sorted(set(range(total)) - set(shards))
    if missing:
        raise HardenError(f"the parts lack {len(missing)} of {total} shards (first: {missing[:5]}); "
                          "finish or resume the missing parts first")
    with atomic_open(out, "w") as handle:
        handle.write(dumps(base) + "\n")
        for idx in range(total):
            lines, marker = shards[idx]
            for line in lines:
                handle.write(line + "\n")
            handle.write(marker + "\n")
    return JournalContents(out)
