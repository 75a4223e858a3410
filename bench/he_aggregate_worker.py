"""Child process of the HE benchmark: sums stored updates as the aggregator does, and reports
the time and the peak resident memory above its own baseline (so imports do not count).

Updates are read from their files chunk by chunk (a lazy sequence). fedhe's codecs are summed
as the service sums a round, chunk index by chunk index (``sum_chunk``), so only one summed chunk
exists at a time; with ``--procs N`` the chunk indices are split into N contiguous ranges, one
process each, and the reported memory is the sum of every process's peak above its own
baseline. The baselines (TenSEAL's usual set-up, plaintext) keep a running sum of whole updates.

Besides wall time, each process reports its CPU time: on a shared machine other jobs stretch
the wall time, while the busiest process's CPU time is what an idle machine would take.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

from bench.he_codecs import FEDHE_KINDS, fedhe_aggregator, summer_for
from fedhe.he.envelope import MAGIC


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset the peak-RSS mark (Linux) and return the current RSS, the baseline."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS")


class EnvelopeFile(Sequence[bytes]):
    """The chunks of an envelope file, read on demand."""

    def __init__(self, path: Path):
        self._fh = path.open("rb")
        self._fh.seek(len(MAGIC))
        (length,) = struct.unpack(">I", self._fh.read(4))
        header = json.loads(self._fh.read(length))
        self._offsets: list[tuple[int, int]] = []
        offset = len(MAGIC) + 4 + length
        for size in header["chunk_sizes"]:
            self._offsets.append((offset, size))
            offset += size

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        offset, size = self._offsets[index]
        self._fh.seek(offset)
        return self._fh.read(size)

    def close(self) -> None:
        self._fh.close()


def _sum_by_update(args: argparse.Namespace, updates: list[Path]) -> dict[str, Any]:
    summer = summer_for(args.kind, (args.dir / "aggregator-context.bin").read_bytes(), args.num_values)
    baseline = _reset_peak()
    started, cpu = time.perf_counter(), time.process_time()
    for site in range(args.sites):
        update = EnvelopeFile(updates[site % len(updates)])
        summer.add(update)
        update.close()
    with (args.dir / "sum.fedhe").open("wb") as out:
        for chunk in summer.result():
            out.write(struct.pack(">Q", len(chunk)) + chunk)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_kib_above_baseline": max(0, _rss_kib("VmHWM") - baseline),
    }


def _sum_index_range(
    kind: str, directory: Path, updates: list[Path], sites: int, start: int, stop: int, part: Path, ready: Any = None
) -> dict[str, float]:
    """Sum chunk indices [start, stop) of ``sites`` updates into ``part`` (length-prefixed).

    ``ready`` (a barrier shared with the other processes) holds every process back until all
    have started up, so the timed window is the summation alone, as in a warm worker pool.
    """
    codec = fedhe_aggregator(
        kind, (directory / "aggregator-context.bin").read_bytes(), (directory / "packing-settings.json").read_text()
    )
    files = [EnvelopeFile(path) for path in updates]
    baseline = _reset_peak()
    if ready is not None:
        ready.wait()
    started, cpu = time.time(), time.process_time()
    with part.open("wb") as out:
        for index in range(start, stop):
            summed = codec.sum_chunk(index, (files[site % len(files)][index] for site in range(sites)))
            out.write(struct.pack(">Q", len(summed)) + summed)
    finished = time.time()
    for update in files:
        update.close()
    return {
        "started": started,
        "finished": finished,
        "cpu_seconds": time.process_time() - cpu,
        "peak_kib": max(0, _rss_kib("VmHWM") - baseline),
    }


def _range_in_child(queue: Any, ready: Any, *task: Any) -> None:
    queue.put(_sum_index_range(*task, ready=ready))


def _sum_by_chunk_index(args: argparse.Namespace, updates: list[Path]) -> dict[str, Any]:
    num_chunks = len(EnvelopeFile(updates[0]))
    bounds = [num_chunks * part // args.procs for part in range(args.procs + 1)]
    parts = [args.dir / f"sum-part-{part}.bin" for part in range(args.procs)]
    tasks = [
        (args.kind, args.dir, updates, args.sites, bounds[part], bounds[part + 1], parts[part])
        for part in range(args.procs)
    ]
    if args.procs == 1:
        results = [_sum_index_range(*tasks[0])]
    else:
        spawn = multiprocessing.get_context("spawn")
        queue, ready = spawn.Queue(), spawn.Barrier(args.procs)
        children = [spawn.Process(target=_range_in_child, args=(queue, ready, *task)) for task in tasks]
        for child in children:
            child.start()
        results = [queue.get() for _ in children]
        for child in children:
            child.join()
    started, cpu = time.time(), time.process_time()
    with (args.dir / "sum.fedhe").open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                shutil.copyfileobj(source, out)
            part.unlink()
    concatenated, concatenated_cpu = time.time() - started, time.process_time() - cpu
    return {
        "seconds": max(r["finished"] for r in results) - min(r["started"] for r in results) + concatenated,
        "cpu_seconds": max(r["cpu_seconds"] for r in results) + concatenated_cpu,
        "peak_kib_above_baseline": sum(r["peak_kib"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--num-values", type=int, required=True)
    parser.add_argument("--procs", type=int, default=1, help="processes summing chunk-index ranges (fedhe codecs)")
    args = parser.parse_args()
    updates = sorted(args.dir.glob("update-*.fedhe"))
    result = _sum_by_chunk_index(args, updates) if args.kind in FEDHE_KINDS else _sum_by_update(args, updates)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
