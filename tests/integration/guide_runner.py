"""Run the ``sh`` blocks of the guides as a newcomer would: in order, in one shell session, for real.

The convention (also stated at the end of docs/operator-guide.md):

* Every fenced block opened with ```` ```sh ```` is a command to run. Blocks in other languages
  (``json``, ``text``, ``console``, ``python``, ...) are shown, never run.
* Blocks run in document order, the operator guide first, then the site-admin guide, with
  ``bash`` (``set -euo pipefail``) in one working directory. Exported variables and the current
  directory carry over from block to block, as in one terminal; anything else (shell functions,
  unexported variables, ``umask``) does not.
* An HTML comment on the line before the fence changes how a block runs:

  - ``<!-- guide-test: background -->``: the block starts long-running processes (the services)
    and returns; the test keeps their process group and stops it (SIGTERM, then SIGKILL) at the
    end. Such a block must not export anything later blocks need.
  - ``<!-- guide-test: skip REASON -->``: not run, because it needs something a test machine does
    not have (a Kubernetes cluster, a browser) or undoes what later blocks need; REASON is required.

  Any other ``guide-test`` comment is an error, so a typo cannot silently skip a block.
* A foreground block must leave nothing running: after it ends, whatever is left in its process
  group is stopped. A block that waits for its own background work (``wait``) is fine.
* The test may set variables before the first block to pick free ports and throw-away database
  names; the guides read them as ``${NAME:-default}``, so they are the guide's own settings.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_DIRECTIVE = re.compile(r"^<!--\s*guide-test:\s*(.*?)\s*-->$")
_MODES = ("background", "skip")
# Variables a block's shell sets for itself; restoring them would confuse the next block.
_NOT_CARRIED = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})
# Prints variable $2 as the exports file $1 sets it; fails if it is not set.
_READ_BACK = ["bash", "-c", 'source "$1"; [ -n "${!2+set}" ] && printf %s "${!2}"', "_"]
_EXPORT_LINE = re.compile(r"^declare -x ([A-Za-z_][A-Za-z0-9_]*)(=|$)")


class GuideFormatError(ValueError):
    """A guide breaks the convention (unknown directive, directive without a block, ...)."""


@dataclass(frozen=True)
class Block:
    """One ```` ```sh ```` block of a guide."""

    document: Path
    line: int
    heading: str
    mode: str  # "run", "background" or "skip"
    code: str
    reason: str = ""

    @property
    def where(self) -> str:
        """``file:line (section)``, for messages."""
        return f"{self.document.name}:{self.line} ({self.heading or 'top'})"


def _mode(document: Path, directive: tuple[int, str] | None) -> tuple[str, str]:
    """How a block runs, from the directive before it (``(line, text)``): mode and reason."""
    if directive is None:
        return "run", ""
    word, _, reason = directive[1].partition(" ")
    if word not in _MODES:
        raise GuideFormatError(f"{document.name}:{directive[0]}: unknown guide-test directive {word!r}")
    if word == "skip" and not reason.strip():
        raise GuideFormatError(f"{document.name}:{directive[0]}: guide-test: skip needs a reason")
    return word, reason.strip()


def extract_blocks(document: Path) -> list[Block]:
    """The ``sh`` blocks of ``document``, in order, with their ``guide-test`` directives."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    heading = ""
    directive: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        index += 1
        if fence is None:
            stripped = line.strip()
            found = _DIRECTIVE.match(stripped)
            if directive is not None and stripped:
                raise GuideFormatError(
                    f"{document.name}:{directive[0]}: a guide-test directive must be the line before a sh block"
                )
            if found is not None:
                directive = (index, found.group(1))
            elif stripped.startswith("#"):
                heading = stripped.lstrip("#").strip()
            continue
        marker, language = fence.group(1), fence.group(2)
        start = index
        while index < len(lines) and not lines[index].startswith(marker):
            index += 1
        body = lines[start:index]
        index += 1  # the closing fence
        if language != "sh":
            if directive is not None:
                raise GuideFormatError(
                    f"{document.name}:{directive[0]}: guide-test directive before a {language} block"
                )
            continue
        mode, reason = _mode(document, directive)
        blocks.append(Block(document, start, heading, mode, "\n".join(body) + "\n", reason))
        directive = None
    if directive is not None:
        raise GuideFormatError(f"{document.name}:{directive[0]}: guide-test directive without a block")
    return blocks


class GuideStepFailed(AssertionError):
    """A guide command failed: names the block, shows it and its output."""


@dataclass
class GuideSession:
    """One terminal's worth of state: a working directory, exported variables, background processes."""

    workdir: Path
    env: dict[str, str]
    state: Path = field(init=False)
    background: list[tuple[Block, subprocess.Popen[bytes], Path]] = field(default_factory=list)
    timings: list[tuple[Block, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = self.workdir.parent / f"{self.workdir.name}-shell-state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.state / "cwd").write_text(str(self.workdir), encoding="utf-8")
        (self.state / "env").write_text("", encoding="utf-8")

    def _script(self, block: Block, *, save: bool) -> Path:
        number = len(self.timings) + len(self.background)
        path = self.state / f"block-{number:03d}.sh"
        saving = f'\nexport -p > "{self.state}/env.next"\npwd > "{self.state}/cwd"\n' if save else "\n"
        path.write_text(
            "set -euo pipefail\n"
            f'source "{self.state}/env"\n'
            f'cd "$(cat "{self.state}/cwd")"\n'
            f"# --- {block.where}\n{block.code}"
            f"{saving}",
            encoding="utf-8",
        )
        return path

    def run(self, block: Block, timeout_s: float) -> str:
        """Run a foreground block; its exports carry over. Raises ``GuideStepFailed`` with its output."""
        script = self._script(block, save=True)
        started = time.monotonic()
        process = subprocess.Popen(
            ["bash", str(script)],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(process.pid)
            output, _ = process.communicate()
            raise GuideStepFailed(self._failure(block, f"did not finish in {timeout_s:.0f} s", output)) from None
        finally:
            stop_group(process.pid)  # whatever the block left running
        self.timings.append((block, time.monotonic() - started))
        text = output.decode("utf-8", errors="replace")
        if process.returncode != 0:
            raise GuideStepFailed(self._failure(block, f"exited with {process.returncode}", output))
        self._carry_exports()
        return text

    def start(self, block: Block) -> None:
        """Start a background block in its own process group; ``stop`` ends it."""
        script = self._script(block, save=False)
        log = self.state / f"{script.stem}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", str(script)],
                cwd=self.workdir,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.background.append((block, process, log))

    def check_background(self) -> None:
        """Fail if a background block itself failed (its processes may have been started in vain)."""
        for block, process, log in self.background:
            if process.poll() not in (None, 0):
                raise GuideStepFailed(
                    self._failure(block, f"(background) exited with {process.returncode}", log.read_bytes())
                )

    def stop(self) -> None:
        """Stop every background block's process group."""
        for _block, process, _log in reversed(self.background):
            stop_group(process.pid)
            process.wait(timeout=5)

    def exported(self, name: str) -> str:
        """The value of a variable the guides exported (as the next block would see it)."""
        result = subprocess.run(
            [*_READ_BACK, str(self.state / "env"), name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise KeyError(f"the guides did not export {name}")
        return result.stdout

    def _carry_exports(self) -> None:
        lines = (self.state / "env.next").read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if (m := _EXPORT_LINE.match(line)) and m.group(1) not in _NOT_CARRIED]
        (self.state / "env").write_text("\n".join(kept) + "\n", encoding="utf-8")

    def _failure(self, block: Block, what: str, output: bytes) -> str:
        text = output.decode("utf-8", errors="replace").splitlines()
        logs = []
        for log in sorted(self.workdir.rglob("*.log")):
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            logs.append(f"--- tail of {log.relative_to(self.workdir)}\n" + "\n".join(tail))
        return (
            f"guide command at {block.where} {what}\n"
            f"--- the block\n{block.code}"
            f"--- its output (last 80 lines)\n" + "\n".join(text[-80:]) + "\n" + "\n".join(logs)
        )


def _members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def stop_group(pgid: int, timeout_s: float = 15) -> None:
    """SIGTERM every process of group ``pgid``, then SIGKILL what is left after ``timeout_s``."""
    if not _members(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
