"""Commands that only talk to the services over REST: sites, federations, members, jobs, accounts.

Credentials and TLS come from ``FEDHE_*`` variables (``fedhe.cli.settings``), never from flags.
The services' URLs come from ``--aggregator`` / ``--keyserver``, defaulting to
``FEDHE_AGGREGATOR_URL`` / ``FEDHE_KEYSERVER_URL`` and then to the default ports on loopback.
Listing commands print a table, or JSON with ``--json``; commands that answer with one object
print JSON, only its id with ``--quiet``, or one field with ``--field NAME``. Secrets the
services issue once (a site's credential, an account's token) can go straight to a 0600 file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.api_client import AggregatorClient, KeyserverClient, ServiceClient
from fedhe.cli.model_tools import model_tools
from fedhe.cli.output import Column, abbreviated, day, emit_listing, emit_object, plain
from fedhe.cli.settings import CliSettings
from fedhe.cli.watch import round_accuracy, watch
from fedhe.errors import InvalidRequest
from fedhe.files import write_private
from fedhe.modelspec import DENSE_ARCHITECTURES
from fedhe.schemas import JobCreate

DEFAULT_AGGREGATOR = "https://127.0.0.1:8080"
DEFAULT_KEYSERVER = "https://127.0.0.1:8090"
AGGREGATOR_URL_ENV = "FEDHE_AGGREGATOR_URL"
KEYSERVER_URL_ENV = "FEDHE_KEYSERVER_URL"
PUBLIC_KEY_SUFFIX = ".pub"
# Architectures whose parameter count the spec alone gives (fedhe.modelspec); the others need a fingerprint.
_COUNTED_ARCHITECTURES = DENSE_ARCHITECTURES | {"cnn"}


def require(args: argparse.Namespace, *names: str) -> None:
    """Refuse a command missing one of ``names``, naming the flags to add."""
    missing = [name for name in names if getattr(args, name, None) in (None, "")]
    if missing:
        flags = ", ".join(
            name.upper() if name in args.positionals else "--" + name.replace("_", "-") for name in missing
        )
        raise InvalidRequest(f"fedhe {args.command} {args.action} needs {flags}")


def refuse_existing(*paths: Path) -> None:
    """Refuse to overwrite a key or credential file (checked before anything is sent)."""
    for path in paths:
        if path.exists():
            raise InvalidRequest(f"{path} exists; refusing to overwrite it")


def with_fingerprint(
    request: JobCreate, custom_modules: Sequence[str] = (), given: NDArray[Any] | None = None
) -> JobCreate:
    """``request`` with its model's fingerprint computed, when the model needs one and it has none.

    Logistic, mlp and cnn models have a parameter count the spec alone gives; the Keras
    applications, custom models and any model that freezes layers need the job creator's build
    (the agent's ``client_agent.models.fingerprint``, with TensorFlow, found through the
    ``fedhe.model_tools`` entry point) so that every site can check its own build against it.
    ``given``: the round-0 weights the job starts from (always fingerprinted anew).
    """
    model = request.model
    needed = model.architecture not in _COUNTED_ARCHITECTURES or model.trainable is not None
    if given is None and (not needed or model.fingerprint is not None):
        return request
    tools = model_tools(f"fingerprinting a {model.architecture} model")
    if given is not None:
        model = model.model_copy(update={"initial_weights_sha256": tools.weights_sha256(given), "fingerprint": None})
    computed = tools.fingerprint(model, request.seed, custom_modules=tuple(custom_modules), given=given)
    return request.model_copy(update={"model": model.model_copy(update={"fingerprint": computed})})


def _weights_file(request: JobCreate, path: str, custom_modules: Sequence[str]) -> NDArray[Any]:
    """The flat round-0 vector a ``--initial-weights`` file holds for the job's model."""
    file = Path(path)
    if not file.is_file():
        raise InvalidRequest(f"--initial-weights {file}: no such file")
    tools = model_tools("--initial-weights")
    return tools.weights_from_file(request.model, file, custom_modules=tuple(custom_modules))


# The default tables fit 80 columns with ids whole; --wide adds the wide_only columns and shows keys
# and timestamps whole (fedhe.cli.output).
KEY_PREFIX = 9
SITE_COLUMNS = [
    Column("id", lambda s: s.id, identifier=True),
    Column("name", lambda s: s.name),
    Column("organisation", lambda s: s.organisation, wide_only=True),
    Column("contact", lambda s: s.contact, wide_only=True),
    Column("status", lambda s: s.status),
    Column("public key", lambda s: s.public_key, lambda s: abbreviated(s.public_key, KEY_PREFIX)),
    Column("registered", lambda s: s.created_at, lambda s: day(s.created_at)),
]
FEDERATION_COLUMNS = [
    Column("id", lambda f: f.id, identifier=True),
    Column("name", lambda f: f.name),
    Column("key", lambda f: f.key_id, lambda f: abbreviated(f.key_id, KEY_PREFIX + 4)),
    Column("endorsements", lambda f: f.endorsements_required),
    Column("created", lambda f: f.created_at, lambda f: day(f.created_at)),
]
MEMBER_COLUMNS = [
    Column("site", lambda m: m.site_id, identifier=True),
    Column("name", lambda m: m.name),
    Column("status", lambda m: m.status),
    Column("public key", lambda m: m.public_key, lambda m: abbreviated(m.public_key, KEY_PREFIX)),
    Column("endorsed by", lambda m: ", ".join(m.endorsed_by) or None, lambda m: len(m.endorsed_by)),
    Column("admitted", lambda m: m.admitted_at, wide_only=True),
]
JOB_COLUMNS = [
    Column("id", lambda j: j.id, identifier=True),
    Column("name", lambda j: j.name),
    Column("federation", lambda j: j.federation_id, wide_only=True),
    Column("status", lambda j: j.status),
    Column("round", lambda j: f"{j.current_round}/{j.rounds}"),
    Column("parameters", lambda j: j.num_parameters, wide_only=True),
    Column("created", lambda j: j.created_at, lambda j: day(j.created_at)),
]
ROUND_COLUMNS = [
    Column("round", lambda r: r.number),
    Column("attempt", lambda r: r.attempt),
    Column("state", lambda r: r.state),
    Column("sites", lambda r: r.num_submissions),
    Column("samples", lambda r: r.total_samples),
    Column("accuracy", round_accuracy),
    # As the aggregator serves them: encrypted bytes uploaded, seconds from opening to publication.
    Column("bytes up", lambda r: r.bytes_uploaded),
    Column("seconds", lambda r: r.duration_s),
]
ACCOUNT_COLUMNS = [
    Column("name", lambda a: a.name),
    Column("role", lambda a: a.role),
    Column("created by", lambda a: a.created_by),
    Column("created", lambda a: a.created_at, lambda a: day(a.created_at)),
    Column("disabled", lambda a: a.disabled_at, lambda a: day(a.disabled_at)),
]
TOKEN_COLUMNS = [
    Column("id", lambda t: t.id, identifier=True),
    Column("label", lambda t: t.label),
    Column("created", lambda t: t.created_at, wide_only=True),
    Column("expires", lambda t: t.expires_at, lambda t: day(t.expires_at)),
    Column("revoked", lambda t: t.revoked_at, lambda t: day(t.revoked_at)),
    Column("last used", lambda t: t.last_used_at, lambda t: day(t.last_used_at)),
]
AUDIT_COLUMNS = [
    Column("at", lambda e: e.at),
    Column("actor", lambda e: e.actor),
    Column("action", lambda e: e.action),
    Column("subject", lambda e: e.subject),
    Column("detail", lambda e: ", ".join(f"{k}={plain(v)}" for k, v in e.detail.items()) or None),
]


def aggregator(args: argparse.Namespace, *, anonymous: bool = False) -> AggregatorClient:
    """An aggregator client with the caller's aggregator token (none for anonymous calls)."""
    settings = CliSettings()
    token = None if anonymous else settings.token("aggregator")
    return AggregatorClient(
        args.aggregator, token, tls=settings.tls(), url_setting=f"--aggregator (or {AGGREGATOR_URL_ENV})"
    )


def keyserver(args: argparse.Namespace, *, anonymous: bool = False) -> KeyserverClient:
    """A keyserver client with the caller's keyserver token (none for signed site requests)."""
    settings = CliSettings()
    token = None if anonymous else settings.token("keyserver")
    return KeyserverClient(
        args.keyserver, token, tls=settings.tls(), url_setting=f"--keyserver (or {KEYSERVER_URL_ENV})"
    )


def _list(args: argparse.Namespace, title: str, columns: Sequence[Column], rows: Sequence[Any]) -> None:
    emit_listing(args.json, title, columns, rows, wide=args.wide)


def _emit(args: argparse.Namespace, value: Any, id_field: str = "id") -> None:
    emit_object(value, quiet=args.quiet, field=args.field, id_field=id_field)


def _site(args: argparse.Namespace) -> None:
    if args.action == "register":
        _register_site(args)
    elif args.action == "endorse":
        _endorse(args)
    elif args.action == "approve":
        _approve_site(args)
    else:
        with aggregator(args) as client:
            if args.action == "list":
                _list(args, "sites", SITE_COLUMNS, client.sites())
            else:
                require(args, "site_id")
                _emit(args, getattr(client, f"{args.action}_site")(args.site_id))


def _approve_site(args: argparse.Namespace) -> None:
    """Approve a site; its credential (shown once) goes to ``--credential-out`` or is printed."""
    require(args, "site_id")
    out = Path(args.credential_out) if args.credential_out else None
    if out is None and (args.quiet or (args.field and args.field != "credential")):
        raise InvalidRequest("the credential is shown only once: add --credential-out FILE to keep it")
    if out is not None:
        refuse_existing(out)
    with aggregator(args) as client:
        approved = client.approve_site(args.site_id)
    if out is None:
        _emit(args, approved, "site.id")
        return
    write_private(out, approved.credential.encode())
    _emit(args, {"site": approved.site.model_dump(mode="json"), "credential_file": str(out)}, "site.id")


def _register_site(args: argparse.Namespace) -> None:
    from fedhe.auth import generate_signing_key, private_key_to_pem, public_key_b64
    from fedhe.schemas import SiteCreate

    require(args, "name", "organisation", "contact")
    key_path = Path(args.key_out)
    public_path = key_path.with_name(key_path.name + PUBLIC_KEY_SUFFIX)
    refuse_existing(key_path, public_path)
    key = generate_signing_key()
    request = SiteCreate(
        name=args.name, organisation=args.organisation, contact=args.contact, public_key=public_key_b64(key)
    )
    with aggregator(args, anonymous=True) as client:
        site = client.register_site(request)
    write_private(key_path, private_key_to_pem(key))
    # The public half, for the keyserver admin who pins it (as ssh-keygen writes id_ed25519.pub).
    public_path.write_text(request.public_key + "\n", encoding="utf-8")
    _emit(args, site)


def _endorse(args: argparse.Namespace) -> None:
    from fedhe.auth import ENDORSE_PURPOSE, private_key_from_pem, sign_request
    from fedhe.schemas import EndorsementCreate

    require(args, "federation", "candidate", "candidate_public_key", "endorser", "signing_key")
    key = private_key_from_pem(Path(args.signing_key).read_bytes())
    timestamp, nonce, signature = sign_request(
        key, ENDORSE_PURPOSE, args.keyserver.rstrip("/"), [args.federation, args.candidate, args.candidate_public_key]
    )
    request = EndorsementCreate(site_id=args.endorser, timestamp=timestamp, nonce=nonce, signature=signature)
    with keyserver(args, anonymous=True) as client:
        _emit(args, client.endorse_member(args.federation, args.candidate, request), "site_id")


def _federation(args: argparse.Namespace) -> None:
    from fedhe.schemas import FederationCreate, MemberCreate

    with keyserver(args) as client:
        if args.action == "create":
            require(args, "name")
            request = FederationCreate(name=args.name, endorsements_required=args.endorsements_required)
            _emit(args, client.create_federation(request))
        elif args.action == "list":
            _list(args, "federations", FEDERATION_COLUMNS, client.federations())
        else:
            require(args, "federation_id")
            if args.action == "rotate":
                _emit(args, client.rotate_key(args.federation_id))
            elif args.action == "members":
                _list(args, f"members of {args.federation_id}", MEMBER_COLUMNS, client.members(args.federation_id))
            elif args.action == "add-member":
                require(args, "site_id", "public_key")
                member = MemberCreate(site_id=args.site_id, public_key=args.public_key, name=args.name or "")
                _emit(args, client.add_member(args.federation_id, member), "site_id")
            elif args.action == "revoke-member":
                require(args, "site_id")
                _emit(args, client.revoke_member(args.federation_id, args.site_id), "site_id")
            else:
                _emit(args, client.federation(args.federation_id))


def _job(args: argparse.Namespace) -> int | None:
    if args.action == "watch":
        require(args, "job_id")
        with aggregator(args) as client:
            return watch(client, args)
    request, given = None, None
    if args.action == "create":
        require(args, "spec")
        spec = JobCreate.model_validate_json(Path(args.spec).read_text(encoding="utf-8"))
        if args.initial_weights:
            given = _weights_file(spec, args.initial_weights, args.custom_module)
        request = with_fingerprint(spec, args.custom_module, given)
    with aggregator(args) as client:
        if request is not None:
            if given is not None and request.model.initial_weights_sha256 is not None:
                vector = np.asarray(given, dtype="<f8").tobytes()
                client.upload_initial_weights(vector, request.model.initial_weights_sha256)
            _emit(args, client.create_job(request))
        elif args.action == "list":
            _list(args, "jobs", JOB_COLUMNS, client.jobs())
        else:
            require(args, "job_id")
            if args.action == "status":
                _emit(args, client.job(args.job_id))
            elif args.action == "rounds":
                _list(args, f"rounds of {args.job_id}", ROUND_COLUMNS, client.rounds(args.job_id))
            elif args.action == "verify":
                require(args, "round")
                verification = client.verify_round(args.job_id, args.round)
                _emit(args, verification, "job_id")
                if verification.uploads_pruned:
                    print(
                        f"fedhe: round {args.round}'s uploads were removed by the retention period; "
                        "its sum cannot be recomputed",
                        file=sys.stderr,
                    )
                return 0 if verification.counters_match and verification.sum_matches else 1
            else:
                _emit(args, client.stop_job(args.job_id))
    return None


def _service_client(args: argparse.Namespace) -> ServiceClient:
    return aggregator(args) if args.service == "aggregator" else keyserver(args)


def _account(args: argparse.Namespace) -> None:
    from fedhe.schemas import AccountCreate, TokenCreate

    with _service_client(args) as client:
        if args.action == "list":
            _list(args, f"{args.service} accounts", ACCOUNT_COLUMNS, client.accounts())
        elif args.action == "whoami":
            _emit(args, client.whoami(), "name")
        elif args.action == "create":
            require(args, "name", "role")
            _check_token_delivery(args)
            account = client.create_account(AccountCreate(name=args.name, role=args.role))
            issued = client.issue_token(account.name, TokenCreate(label=args.label, expires_in_days=args.days))
            _deliver_token(args, issued.token)
            answer = {"account": account.model_dump(mode="json"), "token": issued.info.model_dump(mode="json")}
            _emit(args, answer, "account.name")
        else:
            require(args, "name")
            _emit(args, client.disable_account(args.name), "name")


def _token(args: argparse.Namespace) -> None:
    from fedhe.schemas import TokenCreate

    with _service_client(args) as client:
        if args.action == "revoke":
            require(args, "token_id")
            _emit(args, client.revoke_token(args.token_id))
            return
        require(args, "name")
        if args.action == "list":
            _list(args, f"tokens of {args.name}", TOKEN_COLUMNS, client.tokens(args.name))
        else:
            _check_token_delivery(args)
            issued = client.issue_token(args.name, TokenCreate(label=args.label, expires_in_days=args.days))
            _deliver_token(args, issued.token)
            _emit(args, issued.info)


def _check_token_delivery(args: argparse.Namespace) -> None:
    """Before a token is issued: a quiet command must have a file to put it in, and not overwrite one."""
    if args.token_out:
        refuse_existing(Path(args.token_out))
    elif args.quiet or args.field:
        raise InvalidRequest("the token is shown only once: add --token-out FILE to keep it")


def _deliver_token(args: argparse.Namespace, token: str) -> None:
    """Write a new token to ``--token-out`` (0600), or print it once if no file was named."""
    if args.token_out:
        write_private(Path(args.token_out), token.encode())
        if not (args.quiet or args.field):
            print(f"token written to {args.token_out} (mode 0600); it is not shown again")
    else:
        print(f"token (shown once, store it now): {token}")


def _audit(args: argparse.Namespace) -> None:
    with _service_client(args) as client:
        _list(args, f"{args.service} audit log", AUDIT_COLUMNS, client.audit_events(args.limit))


def _urls(parser: argparse.ArgumentParser, *services: str) -> None:
    if "aggregator" in services:
        parser.add_argument(
            "--aggregator",
            default=os.environ.get(AGGREGATOR_URL_ENV) or DEFAULT_AGGREGATOR,
            help=f"aggregator base URL (default: ${AGGREGATOR_URL_ENV}, else {DEFAULT_AGGREGATOR})",
        )
    if "keyserver" in services:
        parser.add_argument(
            "--keyserver",
            default=os.environ.get(KEYSERVER_URL_ENV) or DEFAULT_KEYSERVER,
            help=f"keyserver base URL (default: ${KEYSERVER_URL_ENV}, else {DEFAULT_KEYSERVER})",
        )


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="listings: print JSON instead of a table")
    parser.add_argument(
        "--wide", action="store_true", help="listings: every column, keys and times whole (wider than 80 columns)"
    )


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the id of what the answer is about")
    parser.add_argument("--field", help="print only this field of the answer (e.g. key_id, status, site.id)")


def _new_token_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", default="", help="what the token is for")
    parser.add_argument("--days", type=int, default=90, help="days until the token expires (1-366)")
    parser.add_argument("--token-out", help="write the new token to this file (0600) instead of printing it")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the REST commands: site, federation, job, account, token, audit."""
    site = sub.add_parser("site", help="register or endorse a site (site admin); decide on one (aggregator admin)")
    site.add_argument("action", choices=["register", "list", "approve", "reject", "revoke", "endorse"])
    site.add_argument("site_id", nargs="?")
    _urls(site, "aggregator", "keyserver")
    site.add_argument("--name")
    site.add_argument("--organisation")
    site.add_argument("--contact")
    site.add_argument(
        "--key-out",
        default="site-signing-key.pem",
        help="register: where to write the signing key (0600); its public half goes to the same name + .pub",
    )
    site.add_argument("--credential-out", help="approve: write the site's credential to this file (0600)")
    site.add_argument("--federation", help="endorse: the federation")
    site.add_argument("--candidate", help="endorse: the proposed member's site id")
    site.add_argument("--candidate-public-key", help="endorse: its public key, as its admin gave it to you")
    site.add_argument("--endorser", help="endorse: your own site id (an active member)")
    site.add_argument("--signing-key", help="endorse: your site's signing key (PEM)")
    _json_flag(site)
    _output_flags(site)
    site.set_defaults(func=_site, positionals=("site_id",))

    federation = sub.add_parser("federation", help="federations and their members (keyserver admin)")
    federation.add_argument(
        "action", choices=["create", "list", "show", "rotate", "members", "add-member", "revoke-member"]
    )
    federation.add_argument("federation_id", nargs="?")
    _urls(federation, "keyserver")
    federation.add_argument("--name")
    federation.add_argument("--endorsements-required", type=int, default=0, help="create: k (0: admin admits alone)")
    federation.add_argument("--site-id", help="add-member / revoke-member: the site")
    federation.add_argument("--public-key", help="add-member: the site's Ed25519 public key, confirmed with its admin")
    _json_flag(federation)
    _output_flags(federation)
    federation.set_defaults(func=_federation, positionals=("federation_id",))

    job = sub.add_parser("job", help="create and follow jobs (aggregator admin or viewer)")
    job.add_argument("action", choices=["create", "list", "status", "rounds", "watch", "verify", "stop"])
    job.add_argument("job_id", nargs="?")
    _urls(job, "aggregator")
    job.add_argument("--spec", help="job definition (JSON) for create")
    job.add_argument(
        "--custom-module",
        action="append",
        default=[],
        help="create: a module a custom model may be imported from, to compute its fingerprint (repeatable)",
    )
    job.add_argument(
        "--initial-weights",
        help="create: start round 0 from this model's weights (.keras model, .h5 weights, or a .npy flat vector)",
    )
    job.add_argument("--interval", type=float, default=1.0, help="watch: seconds between refreshes")
    job.add_argument("--round", type=int, help="verify: the round to rebuild and compare")
    _json_flag(job)
    _output_flags(job)
    job.set_defaults(func=_job, positionals=("job_id",))

    for name, handler, actions in (
        ("account", _account, ["create", "list", "disable", "whoami"]),
        ("token", _token, ["issue", "list", "revoke"]),
        ("audit", _audit, None),
    ):
        parser = sub.add_parser(name, help=f"{name}s of one service (its admins)" if actions else "the audit log")
        if actions:
            parser.add_argument("action", choices=actions)
        parser.add_argument("--service", choices=["aggregator", "keyserver"], required=True)
        _urls(parser, "aggregator", "keyserver")
        if name == "account":
            parser.add_argument("name", nargs="?")
            parser.add_argument("--role", choices=["admin", "viewer", "service"])
            _new_token_flags(parser)
            _output_flags(parser)
        elif name == "token":
            parser.add_argument("name", nargs="?", help="the account (issue, list)")
            parser.add_argument("--token-id", help="revoke: the token's id")
            _new_token_flags(parser)
            _output_flags(parser)
        else:
            parser.add_argument("--limit", type=int, default=50)
        _json_flag(parser)
        parser.set_defaults(func=handler, positionals=("name",))
