"""Child process of the HE benchmark: sums stored updates as the aggregator does, and reports
the time and the peak resident memory above its own baseline (so imports do not count).

Updates are read from their files chunk by chunk (a lazy sequence), so the process holds the
running sum plus one chunk, as a streaming aggregator would.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import overload

from bench.he_codecs import summer_for
from fedhe.he.envelope import MAGIC


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--num-values", type=int, required=True)
    args = parser.parse_args()
    updates = sorted(args.dir.glob("update-*.fedhe"))
    summer = summer_for(args.kind, (args.dir / "aggregator-context.bin").read_bytes(), args.num_values)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
    baseline = _rss_kib("VmRSS")
    started = time.perf_counter()
    for site in range(args.sites):
        update = EnvelopeFile(updates[site % len(updates)])
        summer.add(update)
        update.close()
    with (args.dir / "sum.fedhe").open("wb") as out:
        for chunk in summer.result():
            out.write(struct.pack(">Q", len(chunk)) + chunk)
    seconds = time.perf_counter() - started
    peak = _rss_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_kib_above_baseline": max(0, peak - baseline)}))


if __name__ == "__main__":
    main()
