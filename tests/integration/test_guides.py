"""The operator and site-admin guides, run as written: a guide that drifts from the code fails here.

The ``sh`` blocks of docs/operator-guide.md and then docs/site-admin-guide.md are extracted from
the Markdown at test time (never copied) and run in order in one shell session against real
Postgres, a Redis server of the test's own and the real services over TLS
(``tests/integration/guide_runner.py`` states the convention). Then the outcome is checked: both
jobs completed, every agent says so, accuracy was reported, and the audit logs name the accounts
the guide created. Slow: it trains two jobs with TensorFlow agents.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.cli.operator import round_accuracy
from fedhe.schemas import JobStatus, RoundState
from fedhe.tls import ClientTLS
from fedhe_demo.local_cluster import RedisServer, free_port
from tests.conftest import POSTGRES_ADMIN_URL
from tests.integration.guide_runner import Block, GuideFormatError, GuideSession, extract_blocks

REPO = Path(__file__).resolve().parents[2]
GUIDES = [REPO / "docs" / "operator-guide.md", REPO / "docs" / "site-admin-guide.md"]
BLOCK_TIMEOUT_S = 600
# What the walkthrough must keep doing, whatever else changes in the guides.
REQUIRED_COMMANDS = [
    "fedhe dev-ca",
    "createdb",
    "fedhe keyserver serve",
    "fedhe aggregator serve",
    "fedhe account create",
    "fedhe federation create",
    "fedhe site register",
    "/v1/sites",
    "fedhe site approve",
    "fedhe federation add-member",
    "fedhe site endorse",
    "fedhe job create",
    "fedhe agent",
    "fedhe job watch",
    "fedhe job rounds",
    "fedhe audit",
    "/v1/events",
    "/metrics",
]


def _postgres_env() -> dict[str, str]:
    """PG* variables for the guide's ``createdb`` and database URLs, from the suite's admin URL."""
    info = psycopg.conninfo.conninfo_to_dict(POSTGRES_ADMIN_URL)
    env = {"PGHOST": str(info.get("host", "127.0.0.1")), "PGPORT": str(info.get("port", 5432))}
    if info.get("user"):
        env["PGUSER"] = str(info["user"])
    if info.get("password"):
        env["PGPASSWORD"] = str(info["password"])
    return env


def _drop_databases(prefix: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        for service in ("keyserver", "aggregator"):
            conn.execute(f'DROP DATABASE IF EXISTS "{prefix}_{service}" WITH (FORCE)')


@pytest.fixture
def session(tmp_path: Path) -> Iterator[GuideSession]:
    """A clean working directory, free ports, throw-away database names and a Redis of its own."""
    if shutil.which("redis-server") is None:
        pytest.fail("the guide test needs redis-server")
    redis = RedisServer(tmp_path)
    redis.start()
    prefix = f"fedhe_guide_{uuid.uuid4().hex[:8]}"
    venv_bin = str(Path(sys.executable).parent)
    # The blocks run in another directory: a relative PYTHONPATH entry would point nowhere there.
    python_path = os.pathsep.join(
        str(Path(entry).resolve()) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry
    )
    env = {
        **os.environ,
        "PYTHONPATH": python_path,
        **_postgres_env(),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "KEYSERVER_PORT": str(free_port()),
        "AGGREGATOR_PORT": str(free_port()),
        "TRIAL_DB": prefix,
        "REDIS_URL": f"redis://127.0.0.1:{redis.port}",
        "COLUMNS": "160",
    }
    for name in [name for name in env if name.startswith("FEDHE_")]:
        del env[name]  # the guides set every FEDHE_* variable they need
    guide = GuideSession(tmp_path / "trial", env)
    try:
        yield guide
    finally:
        guide.stop()
        redis.kill()
        _drop_databases(prefix)


def _run_guides(session: GuideSession) -> list[Block]:
    ran: list[Block] = []
    for document in GUIDES:
        for block in extract_blocks(document):
            if block.mode == "skip":
                continue
            if block.mode == "background":
                session.start(block)
            else:
                session.check_background()
                print(f"--- {block.where}", flush=True)
                print(session.run(block, BLOCK_TIMEOUT_S), flush=True)
            ran.append(block)
    return ran


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_guides_run_a_complete_federation(session: GuideSession) -> None:
    ran = _run_guides(session)

    commands = "\n".join(block.code for block in ran)
    missing = [command for command in REQUIRED_COMMANDS if command not in commands]
    assert missing == [], f"the guides no longer run {missing}"

    workdir = session.workdir
    tls = ClientTLS(ca_file=workdir / "tls" / "ca.pem")
    alice = (workdir / "secrets" / "alice-aggregator-token").read_text(encoding="utf-8").strip()
    kim = (workdir / "secrets" / "kim-keyserver-token").read_text(encoding="utf-8").strip()
    jobs = {"three hospitals": session.exported("JOB"), "hospital D": session.exported("JOB_D")}
    with AggregatorClient(session.exported("FEDHE_AGGREGATOR_URL"), alice, tls=tls) as aggregator:
        for what, job_id in jobs.items():
            job = aggregator.job(job_id)
            assert job.status == JobStatus.COMPLETED, what
            published = [r for r in aggregator.rounds(job_id) if r.state == RoundState.PUBLISHED]
            assert [r.number for r in published] == list(range(job.total_rounds)), what
            accuracy = round_accuracy(published[-1])
            assert accuracy is not None, f"no site reported the accuracy of {what}' final model"
            # Three wine cultivars: chance is 1/3; runs reach 0.83-0.97 with fresh DP noise.
            assert accuracy > 0.6, (what, accuracy)
            print(f"final global accuracy, {what}: {accuracy:.3f}")
        aggregator_audit = aggregator.audit_events(1000)
    with KeyserverClient(session.exported("FEDHE_KEYSERVER_URL"), kim, tls=tls) as keyserver:
        keyserver_audit = keyserver.audit_events(1000)

    assert {(e.actor, e.action) for e in aggregator_audit} >= {
        ("account:alice", "job.create"),
        ("account:alice", "site.approved"),
    }
    assert {(e.actor, e.action) for e in keyserver_audit} >= {
        ("account:kim", "federation.create"),
        ("account:kim", "member.admit"),
    }
    for outcome_file in [*sorted(workdir.glob("sites/*/outcome.json")), workdir / "hospital-d" / "outcome.json"]:
        (outcome,) = json.loads(outcome_file.read_text(encoding="utf-8"))
        assert outcome["status"] == "completed", (outcome_file, outcome)
        assert Path(outcome["exported_model"]).is_file()
    assert len(list(workdir.glob("sites/*/outcome.json"))) == 3

    slowest = sorted(session.timings, key=lambda t: -t[1])[:5]
    print("slowest guide blocks:", ", ".join(f"{b.where} {s:.0f} s" for b, s in slowest))


# ---- the convention itself (no services) ----------------------------------------------------


def test_both_guides_follow_the_convention() -> None:
    for document in GUIDES:
        blocks = extract_blocks(document)
        assert blocks, f"{document.name} has no sh blocks"
        assert all(block.mode != "skip" or block.reason for block in blocks)


def test_blocks_are_extracted_in_order_with_their_directives(tmp_path: Path) -> None:
    guide = tmp_path / "guide.md"
    guide.write_text(
        "# Title\n\n## Start\n\n<!-- guide-test: background -->\n```sh\nserve &\n```\n\n"
        '```json\n{"not": "run"}\n```\n\n## Use\n\n```sh\nuse it\n```\n\n'
        "<!-- guide-test: skip needs a cluster -->\n```sh\nkubectl apply\n```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(guide)
    assert [(b.mode, b.code, b.heading, b.reason) for b in blocks] == [
        ("background", "serve &\n", "Start", ""),
        ("run", "use it\n", "Use", ""),
        ("skip", "kubectl apply\n", "Use", "needs a cluster"),
    ]
    assert blocks[1].where == "guide.md:16 (Use)"


@pytest.mark.parametrize(
    "text",
    [
        "<!-- guide-test: backgruond -->\n```sh\nx\n```\n",
        "<!-- guide-test: skip -->\n```sh\nx\n```\n",
        "<!-- guide-test: background -->\n\nSome prose.\n\n```sh\nx\n```\n",
        "<!-- guide-test: skip no shell here -->\n```json\n{}\n```\n",
        "text\n<!-- guide-test: background -->\n",
    ],
)
def test_a_broken_directive_is_an_error_not_a_silent_skip(tmp_path: Path, text: str) -> None:
    guide = tmp_path / "guide.md"
    guide.write_text(text, encoding="utf-8")
    with pytest.raises(GuideFormatError):
        extract_blocks(guide)


def test_exports_and_the_directory_carry_over_between_blocks(tmp_path: Path) -> None:
    session = GuideSession(tmp_path / "work", {"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    blocks = [
        Block(tmp_path / "g.md", 1, "", "run", "export GREETING='hello world'\nLOCAL=1\nmkdir sub\ncd sub\n"),
        Block(tmp_path / "g.md", 5, "", "run", 'test "$GREETING" = "hello world"\ntest -z "${LOCAL:-}"\npwd\n'),
    ]
    session.run(blocks[0], 30)
    assert session.run(blocks[1], 30).strip() == str(tmp_path / "work" / "sub")
    assert session.exported("GREETING") == "hello world"


def test_a_failing_block_names_itself_and_shows_its_output(tmp_path: Path) -> None:
    session = GuideSession(tmp_path / "work", {"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    block = Block(tmp_path / "g.md", 7, "Setup", "run", "echo about to fail\nfalse\necho never\n")
    with pytest.raises(AssertionError) as failed:
        session.run(block, 30)
    message = str(failed.value)
    assert "g.md:7 (Setup) exited with 1" in message
    assert "echo never" in message  # the block is shown
    output = message.split("--- its output")[1]
    assert "about to fail" in output
    assert "never" not in output
