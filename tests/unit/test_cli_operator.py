"""The REST commands' scripting aids: ids and fields for shell variables, secrets into 0600 files,
service URLs from the environment, fingerprints filled in. The services are mocked (httpx
MockTransport); tests/integration/test_guides.py runs the same commands against real ones."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.cli import main
from fedhe.cli import operator as cli_operator
from fedhe.errors import Conflict, InvalidRequest, UpstreamUnavailable
from fedhe.he import CkksParameters
from fedhe.modelspec import ModelSpec
from fedhe.schemas import (
    ContextInfo,
    FederationPublic,
    JobCreate,
    MemberPublic,
    MemberStatus,
    RoundPublic,
    RoundVerification,
    SiteApproved,
    SitePublic,
    SiteStatus,
)

NOW = datetime(2026, 11, 22, tzinfo=UTC)
SITE_ID = "site-0123456789abcdef"
FED_ID = "fed-0123456789abcdef"
KEY_ID = "key-" + "ab" * 16
JOB_ID = "job-0123456789abcdef"


def _site(public_key: str = "k" * 43 + "=") -> SitePublic:
    return SitePublic(
        id=SITE_ID,
        name="Hospital A",
        organisation="Hospital A NHS Trust",
        contact="fl-admin@hospital-a.example",
        public_key=public_key,
        status=SiteStatus.PENDING,
        created_at=NOW,
    )


def _federation() -> FederationPublic:
    context = ContextInfo(key_id=KEY_ID, federation_id=FED_ID, parameters=CkksParameters(), created_at=NOW)
    return FederationPublic(
        id=FED_ID,
        name="wine-trial",
        key_id=KEY_ID,
        created_at=NOW,
        endorsements_required=0,
        bootstrap_complete=False,
        contexts=[context],
    )


class Services:
    """Answers by (method, path); records every request."""

    def __init__(self, routes: dict[tuple[str, str], Callable[[httpx.Request], Any]]):
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes[(request.method, request.url.path)](request)
        body = answer.model_dump(mode="json") if hasattr(answer, "model_dump") else answer
        return httpx.Response(200, json=body)


@pytest.fixture
def services(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Services]:
    """Install mocked services for the CLI (with tokens in the environment, as the CLI wants them)."""
    monkeypatch.setenv("FEDHE_AGGREGATOR_TOKEN", "fht_aggregator-admin-token")
    monkeypatch.setenv("FEDHE_KEYSERVER_TOKEN", "fht_keyserver-admin-token")
    for name in ("FEDHE_AGGREGATOR_URL", "FEDHE_KEYSERVER_URL", "FEDHE_CA_FILE"):
        monkeypatch.delenv(name, raising=False)

    def install(routes: dict[tuple[str, str], Callable[[httpx.Request], Any]]) -> Services:
        mocked = Services(routes)
        transport = httpx.MockTransport(mocked.handle)

        def aggregator(url: str, token: str | None = None, **kwargs: Any) -> AggregatorClient:
            return AggregatorClient(url, token, transport=transport, **kwargs)

        def keyserver(url: str, token: str | None = None, **kwargs: Any) -> KeyserverClient:
            return KeyserverClient(url, token, transport=transport, **kwargs)

        monkeypatch.setattr(cli_operator, "AggregatorClient", aggregator)
        monkeypatch.setattr(cli_operator, "KeyserverClient", keyserver)
        return mocked

    return install


def test_register_quiet_prints_the_id_and_writes_both_halves_of_the_key(
    services: Callable[..., Services], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mocked = services({("POST", "/v1/sites"): lambda r: _site(json.loads(r.content)["public_key"])})
    key = tmp_path / "site" / "signing-key.pem"
    identity = ["--name", "Hospital A", "--organisation", "Trust", "--contact", "a@b.example"]
    code = main(["site", "register", *identity, "--key-out", str(key), "--quiet"])
    assert code == 0
    assert capsys.readouterr().out == f"{SITE_ID}\n"
    sent = json.loads(mocked.requests[0].content)["public_key"]
    assert len(base64.b64decode(sent)) == 32
    assert (tmp_path / "site" / "signing-key.pem.pub").read_text() == sent + "\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "Authorization" not in mocked.requests[0].headers  # registration needs no credential


def test_register_refuses_to_overwrite_a_public_key_file(services: Callable[..., Services], tmp_path: Path) -> None:
    mocked = services({})
    (tmp_path / "key.pem.pub").write_text("someone else's\n")
    identity = ["--name", "A", "--organisation", "B", "--contact", "a@b.example"]
    code = main(["site", "register", *identity, "--key-out", str(tmp_path / "key.pem")])
    assert code == 2
    assert mocked.requests == []
    assert not (tmp_path / "key.pem").exists()


def test_approve_writes_the_credential_to_a_private_file(
    services: Callable[..., Services], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    approved = SiteApproved(site=_site(), credential="fhs_the-credential")
    services({("POST", f"/v1/sites/{SITE_ID}/approve"): lambda r: approved})
    out = tmp_path / "credential"
    assert main(["site", "approve", SITE_ID, "--credential-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["credential_file"] == str(out)
    assert "fhs_the-credential" not in json.dumps(printed)
    assert out.read_text() == "fhs_the-credential"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_approve_quiet_without_a_file_is_refused_before_the_credential_is_lost(
    services: Callable[..., Services], tmp_path: Path
) -> None:
    mocked = services({})
    assert main(["site", "approve", SITE_ID, "--quiet"]) == 2
    (tmp_path / "credential").write_text("an older credential")
    assert main(["site", "approve", SITE_ID, "--credential-out", str(tmp_path / "credential")]) == 2
    assert mocked.requests == []


def test_field_prints_one_value_and_an_unknown_field_is_an_error(
    services: Callable[..., Services], capsys: pytest.CaptureFixture[str]
) -> None:
    services({("GET", f"/v1/federations/{FED_ID}"): lambda r: _federation()})
    assert main(["federation", "show", FED_ID, "--field", "key_id"]) == 0
    assert capsys.readouterr().out == f"{KEY_ID}\n"
    assert main(["federation", "show", FED_ID, "--field", "contexts.0"]) == 2
    assert "unknown_field" in capsys.readouterr().err


def _invalid_federation(_: httpx.Request) -> FederationPublic:
    return FederationPublic.model_validate({})


def _raise(error: Exception) -> Callable[[httpx.Request], Any]:
    def answer(_: httpx.Request) -> Any:
        raise error

    return answer


@pytest.mark.parametrize(
    ("answer", "exit_code", "said"),
    [
        (_raise(InvalidRequest("no such field", code="unknown_field")), 2, "fedhe: unknown_field: no such field\n"),
        (_raise(UpstreamUnavailable("keyserver down")), 3, "fedhe: upstream_unavailable: keyserver down\n"),
        (_raise(Conflict("stale key")), 1, "fedhe: conflict: stale key\n"),
        (_raise(OSError("disk full")), 2, "fedhe: disk full\n"),
        (_invalid_federation, 2, "fedhe: invalid FederationPublic:\n  id: Field required\n"),
    ],
)
def test_a_failed_command_says_why_in_one_line_and_exits_with_the_code_of_its_kind(
    services: Callable[..., Services],
    capsys: pytest.CaptureFixture[str],
    answer: Callable[[httpx.Request], Any],
    exit_code: int,
    said: str,
) -> None:
    services({("GET", f"/v1/federations/{FED_ID}"): answer})
    assert main(["federation", "show", FED_ID]) == exit_code
    assert capsys.readouterr().err.startswith(said)


def test_service_urls_default_to_the_environment(
    services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mocked = services({("GET", f"/v1/federations/{FED_ID}"): lambda r: _federation()})
    monkeypatch.setenv("FEDHE_KEYSERVER_URL", "https://keys.example:9443")
    assert main(["federation", "show", FED_ID, "--quiet"]) == 0
    assert capsys.readouterr().out == f"{FED_ID}\n"
    assert str(mocked.requests[0].url) == f"https://keys.example:9443/v1/federations/{FED_ID}"
    assert mocked.requests[0].headers["Authorization"] == "Bearer fht_keyserver-admin-token"
    assert main(["federation", "show", FED_ID, "--keyserver", "https://other.example", "--quiet"]) == 0
    assert mocked.requests[1].url.host == "other.example"


def test_a_new_token_goes_to_its_file_and_quiet_needs_one(
    services: Callable[..., Services], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = {"name": "alice", "role": "admin", "created_at": NOW.isoformat(), "created_by": "account:root"}
    token = {"id": "tok-0123456789abcdef", "account": "alice", "label": "", "created_at": NOW.isoformat()}
    mocked = services(
        {
            ("POST", "/v1/accounts"): lambda r: account,
            ("POST", "/v1/accounts/alice/tokens"): lambda r: {"token": "fht_secret", "info": token},
        }
    )
    assert main(["account", "create", "alice", "--service", "aggregator", "--role", "admin", "--quiet"]) == 2
    assert mocked.requests == []
    out = tmp_path / "alice-token"
    args = ["account", "create", "alice", "--service", "aggregator", "--role", "admin", "--token-out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out == "alice\n"
    assert out.read_text() == "fht_secret"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_verify_exits_1_when_the_stored_sum_differs(
    services: Callable[..., Services], capsys: pytest.CaptureFixture[str]
) -> None:
    verdicts = iter([(True, True, False), (True, False, False), (False, True, False), (True, False, True)])

    def verify(request: httpx.Request) -> RoundVerification:
        counters, matches, pruned = next(verdicts)
        return RoundVerification(
            job_id=JOB_ID, number=1, submissions=3, counters_match=counters, sum_matches=matches, uploads_pruned=pruned
        )

    services({("GET", f"/v1/jobs/{JOB_ID}/rounds/1/verify"): verify})
    assert main(["job", "verify", JOB_ID, "--round", "1", "--field", "sum_matches"]) == 0
    assert capsys.readouterr().out == "true\n"
    assert main(["job", "verify", JOB_ID, "--round", "1"]) == 1  # the sum differs
    assert main(["job", "verify", JOB_ID, "--round", "1"]) == 1  # the counters differ
    capsys.readouterr()
    assert main(["job", "verify", JOB_ID, "--round", "1"]) == 1  # nothing left to recompute the sum from
    assert capsys.readouterr().err == (
        "fedhe: round 1's uploads were removed by the retention period; its sum cannot be recomputed\n"
    )
    assert main(["job", "verify", JOB_ID]) == 2  # --round is required


def _job_spec(tmp_path: Path, model: dict[str, Any]) -> Path:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"name": "job", "key_id": KEY_ID, "model": model}), encoding="utf-8")
    return spec


def _created(request: httpx.Request) -> dict[str, Any]:
    body = json.loads(request.content)
    spec = JobCreate.model_validate(body)
    return {
        **body,
        "format_id": body["format_id"] or "bfv-packed-v1",
        "id": JOB_ID,
        "federation_id": FED_ID,
        "environment": {"python": "3", "tensorflow": "2", "tensorflow_privacy": "0", "tenseal": "0", "fedhe": "0"},
        "status": "running",
        "current_round": 0,
        "created_at": NOW.isoformat(),
        "num_parameters": spec.model.num_parameters(),
    }


def test_job_create_leaves_a_counted_model_alone(
    services: Callable[..., Services], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mocked = services({("POST", "/v1/jobs"): _created})
    spec = _job_spec(tmp_path, {"architecture": "logistic", "input_dim": 13, "num_classes": 3})
    assert main(["job", "create", "--spec", str(spec), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{JOB_ID}\n"
    assert json.loads(mocked.requests[0].content)["model"]["fingerprint"] is None


@pytest.mark.slow
def test_job_create_computes_a_missing_fingerprint(services: Callable[..., Services], tmp_path: Path) -> None:
    from client_agent.models import fingerprint

    mocked = services({("POST", "/v1/jobs"): _created})
    model = {
        "architecture": "custom",
        "input_shape": [4],
        "num_classes": 2,
        "import_path": "tests.unit.custom_models:tiny",
        "options": {"units": 3},
    }
    spec = _job_spec(tmp_path, model)
    assert main(["job", "create", "--spec", str(spec), "--quiet"]) == 1  # the module is not allowed (refused)
    assert mocked.requests == []
    assert main(["job", "create", "--spec", str(spec), "--custom-module", "tests.unit.custom_models"]) == 0
    sent = json.loads(mocked.requests[0].content)["model"]["fingerprint"]
    expected = fingerprint(ModelSpec.model_validate(model), 0, custom_modules=["tests.unit.custom_models"])
    assert sent == expected.model_dump()
    assert sent["num_parameters"] == 4 * 3 + 3 + 3 * 2 + 2


# Real-looking listings: what the trial of the operator guide shows, with names as long as real sites'.
SITE_NAMES = ["Hospital A", "Hospital B", "Hospital D oncology", "Hospital E radiology"]
SITE_KEYS = [base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 5)]
SITE_IDS = [f"site-{i:016x}" for i in (0x3D1C94BEDE834E16, 0x9D1268216146816A, 0x6A747A1EDC1B8B5F, 0x1BBED098AED82E19)]


def _listed_sites() -> list[dict[str, Any]]:
    statuses = [SiteStatus.APPROVED, SiteStatus.APPROVED, SiteStatus.PENDING, SiteStatus.REJECTED]
    return [
        SitePublic(
            id=site_id,
            name=name,
            organisation=f"{name} NHS Foundation Trust",
            contact=f"fl-admin@{name.lower().replace(' ', '-')}.example",
            public_key=key,
            status=status,
            created_at=NOW,
        ).model_dump(mode="json")
        for site_id, name, key, status in zip(SITE_IDS, SITE_NAMES, SITE_KEYS, statuses, strict=True)
    ]


def _listed_members() -> list[dict[str, Any]]:
    return [
        MemberPublic(
            federation_id=FED_ID,
            site_id=site_id,
            name=name.lower().replace(" ", "-"),
            public_key=key,
            status=MemberStatus.ACTIVE if i < 3 else MemberStatus.PROPOSED,
            proposed_at=NOW,
            admitted_at=NOW if i < 3 else None,
            endorsed_by=SITE_IDS[:2] if i == 3 else [],
        ).model_dump(mode="json")
        for i, (site_id, name, key) in enumerate(zip(SITE_IDS, SITE_NAMES, SITE_KEYS, strict=True))
    ]


def _listed_jobs() -> list[dict[str, Any]]:
    spec = {
        "name": "wine-logistic",
        "key_id": KEY_ID,
        "model": {"architecture": "logistic", "input_dim": 13, "num_classes": 3},
    }
    request = httpx.Request("POST", "/v1/jobs", json=JobCreate.model_validate(spec).model_dump(mode="json"))
    return [_created(request) | {"id": f"job-{i:016x}", "name": name} for i, name in ((1, "wine"), (2, "wine-dp"))]


def _listed_tokens() -> list[dict[str, Any]]:
    return [
        {
            "id": f"tok-{i:016x}",
            "account": "alice",
            "label": label,
            "created_at": NOW.isoformat(),
            "expires_at": NOW.isoformat(),
            "last_used_at": NOW.isoformat(),
        }
        for i, label in ((1, "laptop"), (2, "nightly export job"))
    ]


LISTINGS = {
    "sites": (["site", "list"], ("GET", "/v1/sites"), _listed_sites, SITE_IDS),
    "members": (
        ["federation", "members", FED_ID],
        ("GET", f"/v1/federations/{FED_ID}/members"),
        _listed_members,
        SITE_IDS,
    ),
    "federations": (
        ["federation", "list"],
        ("GET", "/v1/federations"),
        lambda: [_federation().model_dump(mode="json")],
        [FED_ID],
    ),
    "jobs": (["job", "list"], ("GET", "/v1/jobs"), _listed_jobs, [f"job-{1:016x}", f"job-{2:016x}"]),
    "tokens": (
        ["token", "list", "alice", "--service", "aggregator"],
        ("GET", "/v1/accounts/alice/tokens"),
        _listed_tokens,
        [f"tok-{1:016x}", f"tok-{2:016x}"],
    ),
}


@pytest.mark.parametrize("listing", sorted(LISTINGS))
def test_a_listing_fits_80_columns_with_every_id_whole_on_one_line(
    services: Callable[..., Services],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    listing: str,
) -> None:
    argv, route, rows, ids = LISTINGS[listing]
    services({route: lambda r: rows()})
    monkeypatch.setenv("COLUMNS", "80")
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    for row_id in ids:
        assert sum(line.startswith(row_id + " ") for line in lines) == 1, row_id


def test_site_list_abbreviates_keys_at_80_columns_and_shows_them_whole_with_wide(
    services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    services({("GET", "/v1/sites"): lambda r: _listed_sites()})
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["site", "list"]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert narrow[1].split() == ["id", "name", "status", "public", "key", "registered"]
    assert narrow[3].split() == [SITE_IDS[0], "Hospital", "A", "approved", SITE_KEYS[0][:9] + "…", "2026-11-22"]
    assert not any(key in line for key in SITE_KEYS for line in narrow)

    assert main(["site", "list", "--wide"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert wide[1].split() == ["id", "name", "organisation", "contact", "status", "public", "key", "registered"]
    assert wide[3].split() == [
        SITE_IDS[0],
        *["Hospital", "A", "Hospital", "A", "NHS", "Foundation", "Trust"],
        "fl-admin@hospital-a.example",
        "approved",
        SITE_KEYS[0],
        "2026-11-22",
        "00:00:00",
    ]
    assert len(wide) == len(narrow) - 1  # no name wraps any more: one line per site
    for site_id, key in zip(SITE_IDS, SITE_KEYS, strict=True):
        assert sum(line.startswith(site_id + " ") and key in line for line in wide) == 1


def test_listings_in_json_are_whole_whatever_the_width(
    services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    services({("GET", f"/v1/federations/{FED_ID}/members"): lambda r: _listed_members()})
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["federation", "members", FED_ID, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [m["site_id"] for m in printed] == SITE_IDS
    assert [m["public_key"] for m in printed] == SITE_KEYS
    assert printed[3]["endorsed_by"] == SITE_IDS[:2]


def _served_rounds() -> list[dict[str, Any]]:
    """Two attempts as the aggregator serves them to an operator: their figures computed there."""
    base = {
        "job_id": JOB_ID,
        "deadline_at": NOW.isoformat(),
        "opened_at": NOW.isoformat(),
        "total_samples": 120,
        "num_submissions": 3,
    }
    published = base | {
        "number": 0,
        "attempt": 1,
        "state": "published",
        "published_at": NOW.replace(second=42).isoformat(),
        "duration_s": 42.0,
        "bytes_uploaded": 4_194_336,
        "global_metrics": {"accuracy": 0.91},
    }
    running = base | {"number": 1, "attempt": 1, "state": "collecting", "bytes_uploaded": 1_398_112}
    return [RoundPublic.model_validate(r).model_dump(mode="json") for r in (published, running)]


def test_job_rounds_shows_the_bytes_and_seconds_the_aggregator_serves(
    services: Callable[..., Services], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    services({("GET", f"/v1/jobs/{JOB_ID}/rounds"): lambda r: _served_rounds()})
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["job", "rounds", JOB_ID]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["round", "attempt", "state", "sites", "samples", "accuracy", "bytes", "up", "seconds"]
    # No submission is listed with these rounds: the figures can only come from the served fields.
    assert lines[3].split() == ["0", "1", "published", "3", "120", "0.91", "4194336", "42"]
    assert lines[4].split() == ["1", "1", "collecting", "3", "120", "-", "1398112", "-"]
    assert main(["job", "rounds", JOB_ID, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["bytes_uploaded"], r["duration_s"]) for r in printed] == [(4_194_336, 42.0), (1_398_112, None)]


def test_job_watch_follows_the_job_with_the_operators_client(
    services: Callable[..., Services], capsys: pytest.CaptureFixture[str]
) -> None:
    job = _listed_jobs()[0] | {"id": JOB_ID, "status": "completed"}
    mocked = services(
        {
            ("GET", "/v1/sites"): lambda r: [],
            ("GET", f"/v1/jobs/{JOB_ID}"): lambda r: job,
            ("GET", f"/v1/jobs/{JOB_ID}/rounds"): lambda r: _served_rounds()[:1],
        }
    )
    assert main(["job", "watch", JOB_ID, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["bytes_uploaded"] == 4_194_336
    assert lines[-1] == f"job {JOB_ID} ended completed"
    assert all(r.headers["Authorization"] == "Bearer fht_aggregator-admin-token" for r in mocked.requests)
