"""The operators' dashboard in headless Chromium, during a live federation.

Real keyserver and aggregator on loopback over TLS against Postgres, real agents training with
DP-SGD and encrypting with TenSEAL: an admin logs in through the form, approves a pending site
by clicking (and hands its one-time credential to the site's agent, which then takes part),
watches a round advance in the live view without reloading or polling (the page follows
``/v1/events``), and the screenshots of that run go to a temporary directory, or to
``FEDHE_SCREENSHOT_DIR`` (``docs/img`` for the operator guide's) when it is set. A viewer sees no
action buttons and the server refuses a viewer's decision anyway; names from registrations are
rendered as text. Every tab runs with the network blocked but for the aggregator's own origin:
the page, its scripts, the vendored chart library and the API all come from there, and a request
anywhere else fails the test.

Chromium is required, not optional: without it these tests fail (CI installs Debian's).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from playwright.sync_api import Browser, BrowserContext, Locator, Page, Request, Route, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from client_agent.datasets import load_bundled, partition_dirichlet, save_csv, split
from fedhe.api_client import AggregatorClient
from fedhe.auth import generate_signing_key, private_key_to_pem, public_key_b64
from fedhe.environment import current as current_environment
from fedhe.errors import PermissionDenied
from fedhe.files import write_private_text
from fedhe.global_model import weighted_update
from fedhe.he import Envelope, encode_envelope
from fedhe.modelspec import InputNormalisation
from fedhe.privacy import DPSettings
from fedhe.schemas import (
    AccountCreate,
    AgentState,
    DeclineCreate,
    DeclineReason,
    EvaluationCreate,
    FederationCreate,
    HeartbeatCreate,
    JobStatus,
    PrivacyReport,
    RoundPublic,
    RoundState,
    SiteCreate,
    SiteStatus,
    TokenCreate,
)
from fedhe_demo.local_cluster import (
    ManagedProcess,
    ProvisionedSite,
    admit_member,
)
from tests.conftest import Cluster, PostgresDatabases, running_cluster
from tests.factories import job_create, model_spec
from tests.integration.faults_support import MODEL, WEIGHT_SCALE, UploadingSite, uploading_federation

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("FEDHE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The operator guide shows these: FEDHE_SCREENSHOT_DIR=docs/img regenerates them; unset, docs/img is left alone.
SCREENSHOT_DIR = os.environ.get("FEDHE_SCREENSHOT_DIR")
VIEWPORT = {"width": 1400, "height": 900}
ROUNDS = 5
WAIT_MS = 5_000
ROUND_MS = 150_000  # generous: four TensorFlow agents share two cores


@dataclass(frozen=True)
class SiteSpec:
    """A hospital in the scenario, with the privacy budget its admin set (its agent's policy)."""

    key: str
    name: str
    organisation: str
    contact: str
    max_epsilon: float


ST_MARYS = SiteSpec("st-marys", "St Mary's Hospital", "St Mary's NHS Foundation Trust", "fl-ops@stmarys.example", 9.0)
NORTHFIELD = SiteSpec("northfield", "Northfield General", "Northfield Health Board", "it@northfield.example", 8.0)
# Its budget is far too small for a round: its agent declines round 0 and stops.
HARBOUR = SiteSpec("harbour", "Harbour Clinic", "Harbour Community Care", "ops@harbour.example", 0.5)
# Registered but pending: the admin approves it in the browser, then its agent joins round 0.
LAKESIDE = SiteSpec(
    "lakeside", "Lakeside Children's Hospital", "Lakeside Children's Trust", "ml@lakeside.example", 10.0
)
# Registered and left pending, so the approval queue in the screenshots is not empty.
EASTGATE = SiteSpec("eastgate", "Eastgate Medical Centre", "Eastgate Primary Care", "admin@eastgate.example", 5.0)


# ---- the services and the browser ---------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def require_chromium() -> None:
    """Fail, before any service starts, when Chromium is missing: these tests are not optional."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: the dashboard tests need it "
            "(apt-get install -y chromium, or set FEDHE_CHROMIUM to its path)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def cluster(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A keyserver and an aggregator of this module's own (not the session's shared pair).

    The dashboard shows everything an aggregator holds; sites and jobs left by other test
    modules would crowd the screenshots and the counts this module checks.
    """
    with running_cluster(postgres, tmp_path_factory.mktemp("dashboard-cluster")) as started:
        yield started


def spki_pin(cert_file: Path) -> str:
    """base64 SHA-256 of a certificate's public key, as Chromium's SPKI allow-list takes it."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def browser(cluster: Cluster) -> Iterator[Browser]:
    """Headless Chromium that accepts the test cluster's own server key and no other bad certificate.

    The services use a development CA that Chromium does not trust. Rather than ignoring every
    certificate error, the browser is told to accept exactly this run's loopback server key.
    """
    pin = spki_pin(cluster.secrets.server_cert_file)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={pin}"]
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Dashboard:
    """One operator's browser tab on the dashboard, recording everything the page complains about."""

    page: Page
    base_url: str
    screenshots: Path
    problems: list[str] = field(default_factory=list)
    # Every request the page made to the JSON routes (the event stream aside), as "METHOD path?query".
    api_calls: list[str] = field(default_factory=list)
    # Every request for anywhere but the aggregator's origin (each one aborted), as "METHOD url".
    external: list[str] = field(default_factory=list)

    def log_in(self, api_token: str) -> None:
        """Log in through the form, as an operator pasting their API token."""
        self.page.goto(f"{self.base_url}/dashboard")
        expect(self.page.locator("#login-form")).to_be_visible()
        self.page.fill("#api-token", api_token)
        self.page.click("#login-submit")
        expect(self.page.locator("#account")).to_be_visible(timeout=WAIT_MS)
        expect(self.page.locator("#api-token")).to_have_value("")

    def open(self, route: str) -> None:
        """Follow a navigation link or set the hash, as a click would (no reload)."""
        self.page.evaluate("(route) => { location.hash = route; }", route)

    def session(self) -> dict[str, str]:
        """The session this tab keeps."""
        stored: dict[str, str] = json.loads(self.page.evaluate("() => sessionStorage.getItem('fedhe.session')"))
        return stored

    def screenshot(self, name: str, *, full_page: bool = False) -> None:
        """Save a screenshot for the docs, after the page has settled."""
        self.page.wait_for_timeout(400)  # let the progress bars' transitions finish
        self.page.screenshot(path=str(self.screenshots / name), full_page=full_page)

    def screenshot_section(self, name: str, first: str, last: str) -> None:
        """Save the part of the page from element ``first`` down to element ``last``, full width."""
        self.page.wait_for_timeout(400)
        top, bottom = self.page.evaluate(
            "([first, last]) => [document.querySelector(first).getBoundingClientRect().top + scrollY,"
            " document.querySelector(last).getBoundingClientRect().bottom + scrollY]",
            [first, last],
        )
        y = max(0, top - 16)
        clip = {"x": 0, "y": y, "width": VIEWPORT["width"], "height": bottom + 16 - y}
        self.page.screenshot(path=str(self.screenshots / name), full_page=True, clip=clip)

    def wait_for_stream(self) -> None:
        """Wait until the page follows the event stream (it polls until then)."""
        expect(self.page.locator("#status")).to_have_attribute("data-stream", "up", timeout=WAIT_MS)
        self.page.wait_for_timeout(500)  # the catch-up refresh after connecting

    def api_calls_during(self, seconds: float) -> list[str]:
        """The JSON requests the page makes in the next ``seconds``."""
        start = len(self.api_calls)
        self.page.wait_for_timeout(seconds * 1000)
        return self.api_calls[start:]

    def assert_no_problems(self, *allowed: str) -> None:
        """No script error, CSP violation or failed request other than the ``allowed`` ones."""
        unexpected = [p for p in self.problems if not any(text in p for text in allowed)]
        assert not unexpected, unexpected


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``FEDHE_SCREENSHOT_DIR`` when set, else a temporary directory."""
    directory = Path(SCREENSHOT_DIR) if SCREENSHOT_DIR else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def block_the_network(context: BrowserContext, origin: str, external: list[str]) -> None:
    """Let the context's requests reach ``origin`` only: any other is noted in ``external`` and aborted."""

    def guard(route: Route) -> None:
        url = route.request.url
        if url == origin or url.startswith(origin + "/"):
            route.continue_()
        else:
            external.append(f"{route.request.method} {url}")
            route.abort("blockedbyclient")

    context.route("**/*", guard)


@contextmanager
def dashboard(browser: Browser, cluster: Cluster, screenshots: Path) -> Iterator[Dashboard]:
    """A fresh browser context (its own sessionStorage) with one tab on the aggregator, the network
    blocked but for the aggregator's origin; leaving the block without a request elsewhere is checked."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, locale="en-GB", timezone_id="UTC")
    page = context.new_page()
    tab = Dashboard(page, cluster.aggregator_url, screenshots)
    block_the_network(context, cluster.aggregator_url.rstrip("/"), tab.external)

    def note_request(request: Request) -> None:
        path = request.url.removeprefix(cluster.aggregator_url)
        if path.startswith("/v1/") and not path.startswith("/v1/events"):
            tab.api_calls.append(f"{request.method} {path}")

    page.on("request", note_request)
    page.on("console", lambda message: tab.problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: tab.problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: (tab.problems.append(f"unexpected dialog: {dialog.message}"), dialog.dismiss()))
    try:
        yield tab
        assert tab.external == [], "the page asked for something outside the aggregator"
    finally:
        context.close()


# ---- the federation ---------------------------------------------------------------------------


def register(cluster: Cluster, directory: Path, spec: SiteSpec) -> ProvisionedSite:
    """What a site admin does: make a signing key and register the site (it stays pending)."""
    key = generate_signing_key()
    key_file = write_private_text(directory / spec.key / "signing-key.pem", private_key_to_pem(key).decode())
    request = SiteCreate(
        name=spec.name, organisation=spec.organisation, contact=spec.contact, public_key=public_key_b64(key)
    )
    with AggregatorClient(cluster.aggregator_url, tls=cluster.secrets.tls) as anonymous:
        site = anonymous.register_site(request)
    return ProvisionedSite(
        site_id=site.id,
        public_key=site.public_key,
        credential_file=directory / spec.key / "credential",
        signing_key_file=key_file,
    )


def give_credential(site: ProvisionedSite, credential: str) -> None:
    """The site admin stores the credential the aggregator admin handed over."""
    write_private_text(site.credential_file, credential)


@dataclass
class Federation:
    """The scenario: one federation, one job, four member hospitals (one pending approval)."""

    cluster: Cluster
    workdir: Path
    job_id: str
    federation_id: str
    sites: dict[str, ProvisionedSite]
    agents: dict[str, ManagedProcess] = field(default_factory=dict)

    def start_agent(self, key: str, spec: SiteSpec) -> None:
        """Start the site's agent with its data and its privacy budget."""
        policy = self.workdir / spec.key / "policy.json"
        policy.write_text(json.dumps({"max_epsilon": spec.max_epsilon}), encoding="utf-8")
        self.agents[key] = self.cluster.start_agent(
            self.sites[key],
            key,
            data_path=self.workdir / key / "data.csv",
            state_dir=self.workdir / key / "state",
            job_id=self.job_id,
            log_dir=self.workdir / "logs",
            extra_env={"FEDHE_AGENT_POLICY_FILE": str(policy), "FEDHE_AGENT_HEARTBEAT_INTERVAL_S": "5"},
        )

    def job_status(self) -> JobStatus:
        with self.cluster.aggregator_admin() as admin:
            return admin.job(self.job_id).status

    def rounds(self) -> list[RoundPublic]:
        with self.cluster.aggregator_admin() as admin:
            return admin.rounds(self.job_id)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


def set_up_federation(cluster: Cluster, workdir: Path) -> Federation:
    """Federation and job at the services; three hospitals approved, Lakeside pending.

    All four hospitals of the scenario are members at the keyserver (it pins their keys); the
    aggregator expects an answer from a member only once it is approved here too.
    """
    pool, held_out = split(load_bundled("breast_cancer"), 0.2, seed=3)
    parts = partition_dirichlet(pool.y, 3, alpha=5.0, seed=7, min_size=120)
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="Northern breast-cancer network"))
    spec = model_spec(
        30,
        hidden_units=[8],
        normalisation=InputNormalisation(mean=pool.x.mean(0).tolist(), std=pool.x.std(0).tolist()),
    )
    job = job_create(
        federation.key_id,
        name="breast-cancer-mlp",
        model=spec,
        rounds=ROUNDS,
        min_sites=3,  # secure aggregation (the default) sums no fewer than t + 1 = 3 members
        target_sites=3,
        round_deadline_s=300,
        batch_size=16,
        learning_rate=0.2,
        dp=DPSettings(num_microbatches=16),
        max_samples_per_round=10_000,
    )
    with cluster.aggregator_admin() as admin:
        job_id = admin.create_job(job).id
    sites: dict[str, ProvisionedSite] = {}
    data = {ST_MARYS.key: pool.subset(parts[0]), NORTHFIELD.key: pool.subset(parts[1])}
    data |= {LAKESIDE.key: pool.subset(parts[2]), HARBOUR.key: held_out}
    for site_spec in (ST_MARYS, NORTHFIELD, HARBOUR, LAKESIDE):
        site = register(cluster, workdir, site_spec)
        sites[site_spec.key] = site
        save_csv(data[site_spec.key], workdir / site_spec.key / "data.csv")
        if site_spec is not LAKESIDE:
            with cluster.aggregator_admin() as admin:
                give_credential(site, admin.approve_site(site.site_id).credential)
        admit_member(cluster.keyserver_url, cluster.secrets, federation.id, site, site_spec.name)
    return Federation(cluster, workdir, job_id, federation.id, sites)


# ---- what the page shows ----------------------------------------------------------------------

LIVE_ANSWERS = """() => Object.fromEntries([...document.querySelectorAll('#live-round tr[data-answer]')]
    .map((row) => [row.dataset.siteId, row.dataset.answer]))"""

LIVE_ROUND = "() => Number(document.querySelector('#live-round-title')?.dataset.round ?? -1)"


def wait_for_answers(tab: Dashboard, expected: dict[str, str], timeout_ms: int = ROUND_MS) -> None:
    """Wait until the live view shows each site's expected answer to the current round."""
    tab.page.wait_for_function(
        f"(expected) => {{ const shown = ({LIVE_ANSWERS})(); "
        "return Object.entries(expected).every(([site, answer]) => shown[site] === answer); }",
        arg=expected,
        timeout=timeout_ms,
        polling=250,
    )


def weighted_accuracy(round_: RoundPublic) -> float:
    scored = [e for e in round_.evaluations if "accuracy" in e.metrics]
    return sum(e.metrics["accuracy"] * e.num_examples for e in scored) / sum(e.num_examples for e in scored)


def js_round(value: float) -> int:
    """JavaScript's Math.round (halves up, where Python's round goes to the even neighbour)."""
    return math.floor(value + 0.5)


def dashboard_bytes(num_bytes: int) -> str:
    """How the page writes a byte count (dom.js fmtBytes)."""
    units = ["B", "kB", "MB", "GB", "TB"]
    value, unit = float(num_bytes), 0
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{value:.{0 if unit == 0 or value >= 100 else 1}f} {units[unit]}"


def dashboard_seconds(seconds: float) -> str:
    """How the page writes a duration under an hour (dom.js fmtSeconds)."""
    whole = max(0, js_round(seconds))
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60:02d} s"


def attempt_label(round_: RoundPublic) -> str:
    return f"{round_.number} (try {round_.attempt})" if round_.attempt > 1 else str(round_.number)


def legend(page: Page, chart: str) -> Locator:
    """The names in a chart's legend (the x row first; a budget line's row is hidden, the caption names it)."""
    return page.locator(f"#chart-{chart} .u-legend tr.u-series:visible th")


def expect_served_round_figures(page: Page, rounds: list[RoundPublic]) -> None:
    """Each round's served figures are the stored uploads' bytes and its opening-to-publication
    time, and the job page shows them as served: in the cost chart's values and the round history."""
    for r in rounds:
        assert r.bytes_uploaded == sum(s.num_bytes for s in r.submissions) > 0
        assert r.published_at is not None
        assert r.duration_s == (r.published_at - r.opened_at).total_seconds()
    attempts = sorted(rounds, key=lambda r: (r.number, r.attempt))
    unit, scale = ("MB", 1e6) if max(r.bytes_uploaded for r in attempts) >= 1e6 else ("kB", 1e3)
    expect(legend(page, "cost")).to_have_text(["round", f"{unit} received", "duration (s)"])
    rows = page.locator("#chart-cost-values tbody tr")
    expect(rows).to_have_count(len(attempts))
    for row, r in zip(rows.all(), attempts, strict=True):
        assert r.duration_s is not None
        figures = [attempt_label(r), f"{r.bytes_uploaded / scale:.1f} {unit}", f"{r.duration_s:.1f} s"]
        expect(row.locator("td")).to_have_text(figures)
        history = page.locator(f"#round-history tr[data-round='{r.number}'][data-attempt='{r.attempt}']")
        expect(history.locator("td.bytes")).to_have_text(dashboard_bytes(r.bytes_uploaded))
        expect(history.locator("td.duration")).to_have_text(dashboard_seconds(r.duration_s))


def expect_scores_and_epsilon(page: Page, rounds: list[RoundPublic], names: dict[str, str]) -> None:
    """The accuracy and ε charts draw the values the aggregator holds: the latest round's global
    accuracy and loss, and the ε each site reported with its upload to it, by site name."""
    last = rounds[-1]
    expect(legend(page, "scores")).to_have_text(["round", "accuracy (sample-weighted)", "loss"])
    assert last.global_metrics is not None
    scores = page.locator("#chart-scores-values tbody tr").last.locator("td")
    expect(scores).to_have_text(
        [str(last.number), f"{last.global_metrics['accuracy'] * 100:.1f} %", f"{last.global_metrics['loss']:.3f}"]
    )
    spent = {names[s.site_id]: s.metrics["epsilon"] for s in last.submissions}
    expect(legend(page, "epsilon")).to_have_text(["round", *sorted(spent)])
    epsilon = page.locator("#chart-epsilon-values tbody tr").last.locator("td")
    expect(epsilon).to_have_text([str(last.number), *(f"{spent[name]:.2f}" for name in sorted(spent))])


# ---- the tests --------------------------------------------------------------------------------


def test_admin_approves_a_site_and_watches_the_federation_train(
    cluster: Cluster, browser: Browser, screenshots: Path, tmp_path: Path
) -> None:
    federation = set_up_federation(cluster, tmp_path)
    sites = federation.sites
    lakeside = sites[LAKESIDE.key]
    try:
        with dashboard(browser, cluster, screenshots) as tab:
            page = tab.page
            tab.log_in(cluster.secrets.aggregator_admin_token)
            expect(page.locator("#who")).to_contain_text("admin")
            stored = tab.session()
            assert stored["token"] != cluster.secrets.aggregator_admin_token
            assert cluster.secrets.aggregator_admin_token not in page.evaluate(
                "() => JSON.stringify({...sessionStorage}) + JSON.stringify({...localStorage}) + document.cookie"
            ), "the API token must not be kept in the browser"

            # The approval queue lists Lakeside. While nothing changes the page asks nothing (it
            # polled 3 to 5 routes every 2 s before it followed the event stream) ...
            page.click("#nav a[data-section=sites]")
            queued = page.locator(f"#approval-queue tr[data-site-id={lakeside.site_id}]")
            expect(queued).to_contain_text(LAKESIDE.name, timeout=WAIT_MS)
            tab.wait_for_stream()
            assert tab.api_calls_during(5) == []
            # ... and Eastgate's registration appears through the stream, only the sites fetched again.
            before = len(tab.api_calls)
            sites[EASTGATE.key] = register(cluster, tmp_path, EASTGATE)
            expect(page.locator(f"#approval-queue tr[data-site-id={sites[EASTGATE.key].site_id}]")).to_be_visible(
                timeout=3_000
            )
            page.wait_for_timeout(500)
            assert tab.api_calls[before:] == ["GET /v1/sites"]
            expect(page.locator("#status")).to_contain_text("Live: following the aggregator's events")

            # Approve Lakeside by clicking.
            queued.locator("button[data-action=approve]").click()
            expect(page.locator("#confirm-dialog")).to_be_visible()
            expect(page.locator("#confirm-title")).to_have_text(f"Approve {LAKESIDE.name}?")
            page.click("#confirm-ok")
            expect(page.locator("#credential-dialog")).to_be_visible(timeout=WAIT_MS)
            credential = page.input_value("#credential-value")
            assert credential.startswith("fhs_"), "the dialog shows the site credential"
            page.click("#credential-done")
            expect(page.locator("#credential-dialog")).to_be_hidden()
            assert page.input_value("#credential-value") == "", "the credential must leave the page once shown"

            # The UI and the server both say approved.
            expect(queued).to_have_count(0, timeout=WAIT_MS)
            row = page.locator(f"#all-sites tr[data-site-id={lakeside.site_id}]")
            expect(row).to_have_attribute("data-status", "approved", timeout=WAIT_MS)
            expect(row.locator(".site-status")).to_have_text("approved")
            with cluster.aggregator_admin() as admin:
                assert admin.site(lakeside.site_id).status == SiteStatus.APPROVED

            # The three approved hospitals start; Harbour's budget is too small and it declines. The
            # other two advertise their keys and wait: the secure round's roster needs a third member.
            for spec in (ST_MARYS, NORTHFIELD, HARBOUR):
                federation.start_agent(spec.key, spec)
            page.click("#nav a[data-section=jobs]")
            page.click(f"a[href='#jobs/{federation.job_id}']")
            expect(page.locator("#live-round-title")).to_have_attribute("data-round", "0", timeout=WAIT_MS)
            expect(page.locator("#countdown")).to_contain_text("left")
            expect(page.get_by_text("t = 2: the coordinator with fewer than t members reads no update")).to_be_visible()
            page.evaluate("() => { window.noReloadSince = Date.now(); }")
            wait_for_answers(
                tab,
                {
                    sites[ST_MARYS.key].site_id: "advertised",
                    sites[NORTHFIELD.key].site_id: "advertised",
                    sites[HARBOUR.key].site_id: "declined",
                    lakeside.site_id: "waiting",
                },
            )
            declined = page.locator(f"#live-round tr[data-site-id={sites[HARBOUR.key].site_id}]")
            expect(declined).to_contain_text("privacy budget exhausted")
            expect(declined).to_contain_text("over the site's limit 0.5")
            # It uploaded to no round of this job: the ε beside its decline says so, or is its agent's 0.
            expect(declined.locator(".spent-before")).to_have_text(
                re.compile(r"no ε spent in this job before declining|ε 0\.00 spent before declining \(limit 0\.5\)")
            )
            advertised = page.locator(f"#live-round tr[data-site-id={sites[ST_MARYS.key].site_id}]")
            expect(advertised).to_contain_text("key advertised")
            expect(advertised).to_contain_text("waiting for the roster to close")
            expect(page.locator("#figure-advertised .figure-value")).to_have_text("2")
            expect(page.locator("#figure-bytes .figure-value")).to_have_text("0 B")  # nothing uploads before the roster
            # Waiting for Lakeside: heartbeats come as events and cost no request.
            assert tab.api_calls_during(6) == []
            expect(page.locator("#charts-empty")).to_have_text("No uploads yet: the charts appear once sites upload.")
            expect(page.locator("#job-charts .charts")).to_be_hidden()
            countdown = page.locator("#countdown").inner_text()
            expect(page.locator("#countdown")).not_to_have_text(countdown, timeout=3_000)  # it ticks
            tab.screenshot_section("dashboard-round.png", ".topbar", "#live-round")

            # Lakeside's admin installs the credential from the dialog; its key closes the roster and
            # the three members' uploads and unmasking answers complete round 0.
            give_credential(lakeside, credential)
            before = len(tab.api_calls)
            federation.start_agent(LAKESIDE.key, LAKESIDE)
            page.wait_for_function(f"() => ({LIVE_ROUND})() >= 1", timeout=ROUND_MS, polling=250)
            assert page.evaluate("() => typeof window.noReloadSince") == "number", "the page reloaded"
            # Round 0 closing, publishing and round 1 opening reached the page as events: it fetched
            # the job list and the rounds they named, never every site or every round.
            calls = set(tab.api_calls[before:])
            round_calls = {f"GET /v1/jobs/{federation.job_id}/rounds/{n}" for n in (0, 1)}
            assert calls, "the page fetched nothing after the round's events"
            assert calls <= {"GET /v1/jobs", *round_calls}, calls
            published = federation.rounds()[0]
            assert sorted(s.site_id for s in published.submissions) == sorted(
                sites[k].site_id for k in (ST_MARYS.key, NORTHFIELD.key, LAKESIDE.key)
            )
            history = page.locator("#round-history tr[data-round='0']")
            expect(history).to_contain_text("published", timeout=WAIT_MS)
            expect(history).to_contain_text("Harbour Clinic (privacy budget exhausted")

            # The overview and the sites while the job runs.
            page.click("#nav a[data-section=overview]")
            running = page.locator(f"#running-jobs [data-job-id={federation.job_id}]")
            expect(running).to_contain_text("breast-cancer-mlp", timeout=WAIT_MS)
            expect(page.locator("#federations")).to_contain_text("Northern breast-cancer network")
            expect(page.locator("#stat-sites-pending")).to_contain_text("1 pending")  # Eastgate
            expect(running.locator(f"[data-site-id={sites[HARBOUR.key].site_id}]")).to_have_attribute(
                "data-answer", "waiting"
            )
            expect(running).not_to_contain_text("undefined")
            tab.screenshot("dashboard-overview.png", full_page=True)
            page.click("#nav a[data-section=sites]")
            for spec in (ST_MARYS, NORTHFIELD, LAKESIDE):
                expect(page.locator(f"#all-sites tr[data-site-id={sites[spec.key].site_id}] .privacy")).to_contain_text(
                    f"of {spec.max_epsilon:.1f}", timeout=ROUND_MS
                )
            harbour_row = page.locator(f"#all-sites tr[data-site-id={sites[HARBOUR.key].site_id}]")
            expect(harbour_row.locator(".agent")).to_contain_text("declined")
            st_marys = page.locator(f"#all-sites tr[data-site-id={sites[ST_MARYS.key].site_id}]")
            expect(st_marys.locator(".versions dt")).to_contain_text(
                ["fedhe", "Python", "TensorFlow", "TF Privacy", "TenSEAL"]
            )
            expect(st_marys.locator(".versions .mismatch")).to_have_count(0)
            expect(st_marys.locator(".agent")).to_contain_text("online")
            tab.screenshot("dashboard-sites.png", full_page=True)

            # Every round published; the job page charts them.
            deadline = time.monotonic() + ROUND_MS / 1000
            while federation.job_status() == JobStatus.RUNNING and time.monotonic() < deadline:
                time.sleep(1)
            assert federation.job_status() == JobStatus.COMPLETED, [a.tail() for a in federation.agents.values()]
            for key in (ST_MARYS.key, NORTHFIELD.key, LAKESIDE.key):
                assert federation.agents[key].process.wait(timeout=60) == 0, federation.agents[key].tail()
            assert federation.agents[HARBOUR.key].process.wait(timeout=10) == 10, "exit code for a spent budget"
            rounds = federation.rounds()
            assert [r.state.value for r in rounds] == ["published"] * ROUNDS
            page.click("#nav a[data-section=jobs]")
            page.click(f"a[href='#jobs/{federation.job_id}']")
            last = page.locator(f"#round-history tr[data-round='{ROUNDS - 1}']")
            expect(last).to_contain_text(f"{weighted_accuracy(rounds[-1]) * 100:.1f} %", timeout=WAIT_MS * 3)
            expect(page.locator("#live-round-title")).to_contain_text("Job completed")
            # Three sites' ε lines and their budgets, accuracy and loss, bytes and seconds: drawn
            # with the values the aggregator serves.
            for chart, traces in (("scores", 2), ("epsilon", 6), ("cost", 2)):
                expect(page.locator(f"#chart-{chart}")).to_have_attribute("data-traces", str(traces))
            expect_served_round_figures(page, rounds)
            names = {sites[spec.key].site_id: spec.name for spec in (ST_MARYS, NORTHFIELD, LAKESIDE)}
            expect_scores_and_epsilon(page, rounds, names)
            tab.screenshot_section("dashboard-job.png", "#job-charts", "#round-history")
            assert page.evaluate("() => typeof window.noReloadSince") == "number", "the page reloaded"

            # Logging out forgets the session here and revokes it at the aggregator.
            with page.expect_response(lambda response: response.url.endswith(f"/v1/tokens/{stored['id']}/revoke")):
                page.click("#logout")
            expect(page.locator("#login-form")).to_be_visible()
            assert page.evaluate("() => sessionStorage.length") == 0
            revoked = httpx.get(
                f"{cluster.aggregator_url}/v1/whoami",
                headers={"Authorization": f"Bearer {stored['token']}"},
                verify=cluster.secrets.tls.ssl_context(),
            )
            assert revoked.status_code == 401
            tab.assert_no_problems()
    finally:
        federation.stop()


def viewer_token(cluster: Cluster, name: str) -> str:
    with cluster.aggregator_admin() as admin:
        admin.create_account(AccountCreate(name=name, role="viewer"))
        return admin.issue_token(name, TokenCreate(label="dashboard test")).token


def test_a_viewer_sees_no_action_buttons_and_the_server_refuses_them(
    cluster: Cluster, browser: Browser, screenshots: Path, tmp_path: Path
) -> None:
    pending = register(cluster, tmp_path, SiteSpec("westbrook", "Westbrook Hospital", "Westbrook", "a@b.example", 1.0))
    with dashboard(browser, cluster, screenshots) as tab:
        page = tab.page
        page.goto(f"{cluster.aggregator_url}/dashboard")
        page.fill("#api-token", "fht_not-a-token")
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#login-error")).not_to_be_empty()
        assert page.evaluate("() => sessionStorage.length") == 0
        tab.log_in(viewer_token(cluster, "ward-viewer"))
        expect(page.locator("#who")).to_contain_text("ward-viewer")
        expect(page.locator("#who")).to_contain_text("viewer")
        for section in ("overview", "sites", "jobs"):
            page.click(f"#nav a[data-section={section}]")
            expect(page.locator("#view")).to_have_attribute("data-section", section)
            page.wait_for_timeout(300)
            expect(page.locator("#view button")).to_have_count(0)
        page.click("#nav a[data-section=sites]")
        expect(page.locator(f"#approval-queue tr[data-site-id={pending.site_id}]")).to_contain_text("Westbrook")
        expect(page.locator("#approval-queue")).to_contain_text("only admins approve")
        expect(page.locator("button[data-action]")).to_have_count(0)
        session = tab.session()
        tab.assert_no_problems("401")  # the wrong token
    with (
        AggregatorClient(cluster.aggregator_url, session["token"], tls=cluster.secrets.tls) as as_viewer,
        pytest.raises(PermissionDenied),
    ):
        as_viewer.approve_site(pending.site_id)
    with cluster.aggregator_admin() as admin:
        assert admin.site(pending.site_id).status == SiteStatus.PENDING


def test_registrations_are_shown_as_text_and_admins_reject_and_revoke_by_clicking(
    cluster: Cluster, browser: Browser, screenshots: Path, tmp_path: Path
) -> None:
    hostile = SiteSpec(
        "hostile",
        '<img src=x onerror="window.injected=1">',
        "<script>window.injected=2</script>",
        '"><b>contact</b>',
        1.0,
    )
    site = register(cluster, tmp_path, hostile)
    approved = register(cluster, tmp_path, SiteSpec("ridge", "Ridge Hospital", "Ridge", "r@ridge.example", 1.0))
    with cluster.aggregator_admin() as admin:
        admin.approve_site(approved.site_id)
    with dashboard(browser, cluster, screenshots) as tab:
        page = tab.page
        tab.log_in(cluster.secrets.aggregator_admin_token)
        page.click("#nav a[data-section=sites]")
        queued = page.locator(f"#approval-queue tr[data-site-id={site.site_id}]")
        expect(queued).to_contain_text(hostile.name, timeout=WAIT_MS)
        expect(queued).to_contain_text(hostile.organisation)
        expect(queued).to_contain_text(hostile.contact)
        assert page.locator("#view img, #view script, #view b").count() == 0
        assert page.evaluate("() => window.injected") is None

        queued.locator("button[data-action=reject]").click()
        page.click("#confirm-ok")
        row = page.locator(f"#all-sites tr[data-site-id={site.site_id}]")
        expect(row).to_have_attribute("data-status", "rejected", timeout=WAIT_MS)
        page.locator(f"#all-sites tr[data-site-id={approved.site_id}] button[data-action=revoke]").click()
        expect(page.locator("#confirm-title")).to_have_text("Revoke Ridge Hospital?")
        page.click("#confirm-ok")
        revoked = page.locator(f"#all-sites tr[data-site-id={approved.site_id}]")
        expect(revoked).to_have_attribute("data-status", "revoked", timeout=WAIT_MS)
        with cluster.aggregator_admin() as admin:
            assert admin.site(site.site_id).status == SiteStatus.REJECTED
            assert admin.site(approved.site_id).status == SiteStatus.REVOKED
            # A session that ends elsewhere (revoked, expired) sends the tab back to the login form.
            admin.revoke_token(tab.session()["id"])
        # The event stream checks its session every 5 s, ends, and the page's reconnection gets 401.
        expect(page.locator("#login-error")).to_contain_text("session has ended", timeout=15_000)
        assert page.evaluate("() => sessionStorage.length") == 0
        assert page.evaluate("() => window.injected") is None
        tab.assert_no_problems("401")


def test_without_the_event_stream_the_page_says_so_and_polls_slowly(
    cluster: Cluster, browser: Browser, screenshots: Path
) -> None:
    with dashboard(browser, cluster, screenshots) as tab:
        page = tab.page
        page.route("**/v1/events", lambda route: route.abort())
        tab.log_in(cluster.secrets.aggregator_admin_token)
        page.click("#nav a[data-section=sites]")
        status = page.locator("#status")
        expect(status).to_have_attribute("data-stream", "down", timeout=WAIT_MS)
        expect(status).to_contain_text("Live updates unavailable")
        expect(status).to_contain_text("refreshing every 15 s")
        calls = tab.api_calls_during(16)
        # Whole refreshes of what the sites page shows, every 15 s: one in 16 s, or two when the window
        # starts just before one (it made 8 every 2 s before).
        refreshes = Counter(calls)
        assert set(refreshes) == {"GET /v1/federations", "GET /v1/jobs", "GET /v1/sites"}, calls
        assert set(refreshes.values()) in ({1}, {2}), calls
        tab.assert_no_problems("ERR_FAILED", "/v1/events")


def heartbeat(cluster: Cluster, credential: str, report: HeartbeatCreate) -> None:
    """What a site's agent sends, sent here by hand so the test chooses the state."""
    with AggregatorClient(cluster.aggregator_url, credential, tls=cluster.secrets.tls) as agent:
        agent.heartbeat(report)


def dashboard_time(at: datetime) -> str:
    """How the page writes a moment in a browser set to UTC."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def test_members_without_a_job_agents_per_job_declines_with_their_epsilon_and_dated_times(
    cluster: Cluster, browser: Browser, screenshots: Path, tmp_path: Path
) -> None:
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="Coastal imaging group"))
    ridgeway = register(cluster, tmp_path, SiteSpec("ridgeway", "Ridgeway Infirmary", "Ridgeway", "r@w.example", 2.0))
    moorland = register(cluster, tmp_path, SiteSpec("moorland", "Moorland Hospital", "Moorland", "m@m.example", 2.0))
    credentials = {}
    for site, name in ((ridgeway, "Ridgeway Infirmary"), (moorland, "Moorland Hospital")):
        with cluster.aggregator_admin() as admin:
            credentials[site.site_id] = admin.approve_site(site.site_id).credential
        admit_member(cluster.keyserver_url, cluster.secrets, federation.id, site, name)
    # The aggregator caches the keyserver's federation list for membership_cache_s (10 s).
    deadline = time.monotonic() + 15
    with cluster.aggregator_admin() as admin:
        while federation.id not in {f.id for f in admin.federations()} and time.monotonic() < deadline:
            time.sleep(0.5)

    with dashboard(browser, cluster, screenshots) as tab:
        page = tab.page
        tab.log_in(cluster.secrets.aggregator_admin_token)
        # A federation shows with its members before it has a job, on the overview and beside each site.
        row = page.locator(f"#federations tr[data-federation-id={federation.id}]")
        expect(row.locator(".members")).to_have_text("2", timeout=WAIT_MS)
        expect(row).to_contain_text("no job yet")
        page.click("#nav a[data-section=sites]")
        for site in (ridgeway, moorland):
            expect(page.locator(f"#all-sites tr[data-site-id={site.site_id}]")).to_contain_text("Coastal imaging group")

        job = job_create(
            federation.key_id,
            name="coastal-first",
            model=model_spec(4),
            rounds=2,
            min_sites=1,
            secure_aggregation=None,
            max_samples_per_round=1_000,
        )
        with cluster.aggregator_admin() as admin:
            first = admin.create_job(job)
            second = admin.create_job(job.model_copy(update={"name": "coastal-second"}))
        environment = current_environment()
        heartbeat(
            cluster,
            credentials[ridgeway.site_id],
            HeartbeatCreate(state=AgentState.TRAINING, job_id=first.id, round=0, environment=environment),
        )

        # The second job's page: Ridgeway's agent works on the first job, and says only that.
        tab.open(f"jobs/{second.id}")
        agent = page.locator(f"#live-round tr[data-site-id={ridgeway.site_id}] .agent-in-job")
        expect(agent).to_have_text("busy with coastal-first", timeout=WAIT_MS)
        expect(agent.locator(".chip")).to_have_count(0)
        # No upload yet: a sentence, not an empty chart.
        expect(page.locator("#charts-empty")).to_have_text("No uploads yet: the charts appear once sites upload.")
        expect(page.locator("#job-charts .charts")).to_be_hidden()
        expect(page.locator("#chart-scores[data-traces]")).to_have_count(0)
        # Times carry their date and zone.
        created = page.locator(".facts dt:text-is('Created') + dd")
        expect(created).to_have_text(dashboard_time(second.created_at))
        round_0 = federation_round(cluster, second.id)
        expect(page.locator("#round-opened")).to_have_text(f"opened {dashboard_time(round_0.opened_at)}")
        tab.wait_for_stream()

        # Moorland spent ε 1.25 of its 2.0 elsewhere and declines; Ridgeway moves to this job. Both
        # reach the page as events: the heartbeat costs no request, the decline one round fetch.
        before = len(tab.api_calls)
        privacy = PrivacyReport(epsilon=1.25, delta=1e-5, max_epsilon=2.0)
        heartbeat(
            cluster,
            credentials[moorland.site_id],
            HeartbeatCreate(
                state=AgentState.DECLINED, job_id=second.id, round=0, environment=environment, privacy=privacy
            ),
        )
        with AggregatorClient(
            cluster.aggregator_url, credentials[moorland.site_id], tls=cluster.secrets.tls
        ) as agent_of_moorland:
            agent_of_moorland.decline_round(
                second.id, 0, DeclineCreate(reason=DeclineReason.BUDGET_EXHAUSTED, message="ε would reach 2.4")
            )
        declined = page.locator(f"#live-round tr[data-site-id={moorland.site_id}]")
        expect(declined).to_have_attribute("data-answer", "declined", timeout=3_000)
        expect(declined.locator(".spent-before")).to_have_text("ε 1.25 spent before declining (limit 2.0)")
        decline_at = federation_round(cluster, second.id).declines[0].at
        expect(declined).to_contain_text(f"({dashboard_time(decline_at)})")
        heartbeat(
            cluster,
            credentials[ridgeway.site_id],
            HeartbeatCreate(state=AgentState.WAITING, job_id=second.id, round=0, environment=environment),
        )
        expect(agent).to_have_text("waiting round 0", timeout=3_000)
        page.wait_for_timeout(500)
        assert tab.api_calls[before:] == [f"GET /v1/jobs/{second.id}/rounds/0"]
        tab.screenshot_section("dashboard-declined.png", "#live-round", "#job-charts")

        # The first job's page shows Ridgeway's state in that job no more.
        tab.open(f"jobs/{first.id}")
        expect(page.locator(f"#live-round tr[data-site-id={ridgeway.site_id}] .agent-in-job")).to_have_text(
            "busy with coastal-second", timeout=WAIT_MS
        )
        tab.assert_no_problems()


def federation_round(cluster: Cluster, job_id: str) -> RoundPublic:
    with cluster.aggregator_admin() as admin:
        return admin.rounds(job_id)[-1]


def upload_body(site: UploadingSite, seed: int, epsilon: float) -> bytes:
    """A real encrypted update, with the ε a site's DP-SGD would report beside it."""
    change = np.random.default_rng(seed).uniform(-0.1, 0.1, MODEL.num_parameters())
    chunks = site.codec.encrypt_update(weighted_update(change, np.zeros_like(change), 40, WEIGHT_SCALE))
    meta = {"num_samples": 40, "metrics": {"epsilon": epsilon}, "environment": current_environment().model_dump()}
    return encode_envelope(
        Envelope(format_id=site.codec.format_id, key_id=site.key_id, num_values=change.size, chunks=chunks, meta=meta)
    )


def wait_for_publication(cluster: Cluster, job_id: str, number: int) -> None:
    deadline = time.monotonic() + 60
    with cluster.aggregator_admin() as admin:
        while time.monotonic() < deadline:
            if any(r.number == number and r.state == RoundState.PUBLISHED for r in admin.rounds(job_id)):
                return
            time.sleep(0.25)
    pytest.fail(f"round {number} of {job_id} was not published within 60 s")


def test_every_page_renders_from_the_aggregator_alone_with_the_network_blocked(
    cluster: Cluster, browser: Browser, screenshots: Path, tmp_path: Path
) -> None:
    """Overview, sites, the job list and a job's page (its last round, three charts, the history)
    render with every request outside the aggregator's origin aborted, and none is made: the
    chart library is the one vendored in the aggregator's package."""
    job_id, (uploader,) = uploading_federation(
        cluster.secrets,
        cluster.keyserver_url,
        cluster.aggregator_url,
        tmp_path,
        1,
        name="offline",
        rounds=2,
        min_sites=1,
    )
    site_id = uploader.site.site_id
    sizes = []
    with AggregatorClient(cluster.aggregator_url, uploader.site.credential, tls=cluster.secrets.tls) as as_site:
        for number, epsilon in ((0, 0.75), (1, 1.5)):
            body = upload_body(uploader, number, epsilon)
            response = uploader.post(cluster.aggregator_url, job_id, number, body)
            assert response.status_code == 201, response.text
            sizes.append(len(body))
            wait_for_publication(cluster, job_id, number)
            metrics = {"accuracy": 0.7 + number / 10, "loss": 0.6 - number / 10}
            as_site.post_evaluation(job_id, number, EvaluationCreate(num_examples=50, metrics=metrics))
        privacy = PrivacyReport(epsilon=1.5, delta=1e-5, max_epsilon=3.0)
        as_site.heartbeat(
            HeartbeatCreate(
                state=AgentState.FINISHED, job_id=job_id, round=1, environment=current_environment(), privacy=privacy
            )
        )
    with cluster.aggregator_admin() as admin:
        job = admin.job(job_id)
        rounds = admin.rounds(job_id)
        name = admin.site(site_id).name
    assert job.status == JobStatus.COMPLETED
    # The served bytes are the uploads' bodies as the aggregator stored them.
    assert [r.bytes_uploaded for r in rounds] == sizes

    with dashboard(browser, cluster, screenshots) as tab:
        page = tab.page
        # The block holds: a request for anywhere else is aborted, and noted.
        probe = page.context.new_page()
        with pytest.raises(PlaywrightError):
            probe.goto("https://cdn.example.org/uplot.min.js")
        probe.close()
        assert tab.external == ["GET https://cdn.example.org/uplot.min.js"]
        tab.external.clear()

        tab.log_in(cluster.secrets.aggregator_admin_token)
        expect(page.locator("#view")).to_have_attribute("data-section", "overview")
        federation = page.locator(f"#federations tr[data-federation-id={job.federation_id}]")
        expect(federation.locator(".members")).to_have_text("1", timeout=WAIT_MS)
        expect(federation).to_contain_text("offline")
        expect(page.locator("#stat-job-counts")).to_contain_text("completed")

        page.click("#nav a[data-section=sites]")
        site = page.locator(f"#all-sites tr[data-site-id={site_id}]")
        expect(site).to_have_attribute("data-status", "approved", timeout=WAIT_MS)
        expect(site.locator(".privacy")).to_contain_text("of 3.0")

        page.click("#nav a[data-section=jobs]")
        listed = page.locator(f"#view a[href='#jobs/{job_id}']")
        expect(listed).to_have_text("offline", timeout=WAIT_MS)
        listed.click()
        expect(page.locator("#live-round-title")).to_contain_text("Job completed: last round 1", timeout=WAIT_MS)
        expect(page.locator(f"#live-round tr[data-site-id={site_id}]")).to_have_attribute("data-answer", "uploaded")
        expect(page.locator("#figure-bytes .figure-value")).to_have_text(dashboard_bytes(sizes[1]))
        for chart in ("scores", "epsilon", "cost"):
            expect(page.locator(f"#chart-{chart}")).to_have_attribute("data-traces", "2", timeout=WAIT_MS)
            expect(page.locator(f"#chart-{chart} canvas")).to_have_count(1)
        expect_served_round_figures(page, rounds)
        expect_scores_and_epsilon(page, rounds, {site_id: name})
        expect(page.locator("#round-history tbody tr")).to_have_count(2)

        # Everything the page loaded came from the aggregator, the chart library from its package.
        loaded = page.evaluate("() => performance.getEntriesByType('resource').map((entry) => entry.name)")
        assert all(url.startswith(cluster.aggregator_url + "/") for url in loaded), loaded
        assert f"{cluster.aggregator_url}/dashboard/assets/vendor/uplot-1.6.32/uPlot.esm.js" in loaded
        tab.assert_no_problems()
