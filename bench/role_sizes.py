"""Installed size of each role's image, from its lock file's wheels: ``make role-sizes``.

For every pin of ``requirements/<role>.lock`` this picks the wheel pip would install in the
images (CPython 3.11, glibc x86_64 as in python:3.11.7-slim-bookworm, a file whose sha256 the
lock lists), reads only the wheel's zip directory from PyPI with HTTP range requests and sums
the uncompressed sizes of its files: what pip unpacks into the virtualenv, before it compiles
bytecode. "Before" is every role installing the whole ``requirements/runtime.lock``, as every
image did before the per-role locks. The base image and fedhe itself are left out (the same
in every role).

Writes ``bench/results/role_sizes.md`` and ``.json``. Sizes already in that JSON for the same
wheel are reused, so a run after an unchanged lock needs no network.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import ssl
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
ROLES = ("agent", "aggregator", "keyserver", "cli")
BEFORE = "runtime"
INDEX = "https://pypi.org/simple"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
# glibc 2.36 (Debian bookworm, the images' base) down to the oldest manylinux, x86_64.
_GLIBC_MINORS = range(36, 4, -1)
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
PLATFORMS = [
    name
    for minor in _GLIBC_MINORS
    for name in (f"manylinux_2_{minor}_x86_64", *([f"{_LEGACY[minor]}_x86_64"] if minor in _LEGACY else []))
] + ["linux_x86_64"]
SUPPORTED: list[Tag] = [
    *cpython_tags(python_version=(3, 11), abis=["cp311"], platforms=PLATFORMS),
    *compatible_tags(python_version=(3, 11), interpreter="cp311", platforms=PLATFORMS),
]
PREFERENCE = {tag: rank for rank, tag in enumerate(SUPPORTED)}


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: frozenset[str]


def read_lock(role: str) -> list[Pin]:
    """The pins of requirements/<role>.lock with the sha256 hashes each may be installed from."""
    pins: list[Pin] = []
    name = version = None
    hashes: set[str] = set()
    for line in (REQUIREMENTS / f"{role}.lock").read_text(encoding="utf-8").splitlines():
        if match := PIN.match(line):
            if name is not None and version is not None:
                pins.append(Pin(name, version, frozenset(hashes)))
            name, version, hashes = str(canonicalize_name(match.group(1))), match.group(2), set()
        hashes.update(HASH.findall(line))
    if name is not None and version is not None:
        pins.append(Pin(name, version, frozenset(hashes)))
    return pins


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file, read with HTTP range requests (for zipfile)."""

    def __init__(self, client: httpx.Client, url: str, size: int):
        self._client, self._url, self._size, self._pos = client, url, size, 0
        self.requests = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        response = self._client.get(self._url, headers={"Range": f"bytes={self._pos}-{end - 1}"})
        response.raise_for_status()
        self.requests += 1
        data = response.content if response.status_code == 206 else response.content[self._pos : end]
        self._pos += len(data)
        return data


def choose_wheel(client: httpx.Client, pin: Pin) -> dict[str, Any]:
    """The index's entry for the wheel pip would pick for the images among the lock's hashes."""
    response = client.get(
        f"{INDEX}/{pin.name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}, follow_redirects=True
    )
    response.raise_for_status()
    best: tuple[int, dict[str, Any]] | None = None
    for entry in response.json()["files"]:
        if not entry["filename"].endswith(".whl") or entry["hashes"].get("sha256") not in pin.hashes:
            continue
        name, version, _, tags = parse_wheel_filename(entry["filename"])
        if name != pin.name or str(version) != pin.version:
            continue
        rank = min((PREFERENCE[t] for t in tags if t in PREFERENCE), default=None)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, entry)
    if best is None:
        raise SystemExit(f"{pin.name}=={pin.version}: no wheel in the lock for CPython 3.11 on glibc x86_64")
    return best[1]


def measure(client: httpx.Client, pin: Pin, known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Size of one pin's wheel: compressed (the download) and unpacked (the files it installs)."""
    key = f"{pin.name}=={pin.version}"
    if key in known and known[key]["sha256"] in pin.hashes:
        return known[key]
    entry = choose_wheel(client, pin)
    remote = RangeFile(client, entry["url"], int(entry["size"]))
    with zipfile.ZipFile(remote) as wheel:
        unpacked = sum(info.file_size for info in wheel.infolist())
        files = len(wheel.infolist())
    print(f"  {entry['filename']}: {unpacked / 1e6:,.1f} MB in {files:,} files ({remote.requests} range requests)")
    return {
        "wheel": entry["filename"],
        "sha256": entry["hashes"]["sha256"],
        "download_bytes": int(entry["size"]),
        "unpacked_bytes": unpacked,
        "files": files,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f}"


def report(results: dict[str, Any]) -> str:
    before = results["roles"][BEFORE]
    lines = [
        "# Installed size per role (from the lock files' wheels)",
        "",
        "Unpacked wheel contents of each role's `requirements/<role>.lock` (CPython 3.11, glibc x86_64;",
        "before bytecode compilation; without the base image and fedhe itself). *Before*: every image",
        "installed the whole `requirements/runtime.lock`. `make role-sizes` measures this again.",
        "",
        "| role (image) | packages before → after | download MB before → after "
        "| installed MB before → after | installed saved |",
        "|---|---|---|---|---|",
    ]
    images = {"agent": "fedhe-client-agent", "aggregator": "fedhe-aggregator", "keyserver": "fedhe-keyserver"}
    for role in ROLES:
        after = results["roles"][role]
        name = (
            f"{role} (`{images[role]}`)"
            if role in images
            else f"{role} (no image: an operator's `requirements/cli.lock`)"
        )
        saved = 1 - after["unpacked_bytes"] / before["unpacked_bytes"]
        lines.append(
            f"| {name} | {before['packages']} → {after['packages']} "
            f"| {_mb(before['download_bytes'])} → {_mb(after['download_bytes'])} "
            f"| {_mb(before['unpacked_bytes'])} → {_mb(after['unpacked_bytes'])} | {saved:.0%} |"
        )
    biggest = sorted(results["packages"].items(), key=lambda item: -item[1]["unpacked_bytes"])[:10]
    lines += [
        "",
        "Largest packages (installed MB): "
        + ", ".join(f"{key.split('==')[0]} {_mb(value['unpacked_bytes'])}" for key, value in biggest)
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    previous = args.out / "role_sizes.json"
    known: dict[str, dict[str, Any]] = (
        json.loads(previous.read_text(encoding="utf-8"))["packages"] if previous.exists() else {}
    )
    packages: dict[str, dict[str, Any]] = {}
    roles: dict[str, Any] = {}
    with httpx.Client(timeout=60, verify=ssl.create_default_context()) as client:
        for role in (BEFORE, *ROLES):
            print(f"{role}.lock")
            pins = read_lock(role)
            for pin in pins:
                key = f"{pin.name}=={pin.version}"
                if key not in packages:
                    packages[key] = measure(client, pin, known)
            keys = [f"{pin.name}=={pin.version}" for pin in pins]
            roles[role] = {
                "packages": len(keys),
                "download_bytes": sum(packages[k]["download_bytes"] for k in keys),
                "unpacked_bytes": sum(packages[k]["unpacked_bytes"] for k in keys),
                "pins": keys,
            }
    results = {"before": BEFORE, "roles": roles, "packages": dict(sorted(packages.items()))}
    args.out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = report(results)
    (args.out / "role_sizes.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
