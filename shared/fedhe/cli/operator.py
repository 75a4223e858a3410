"""Commands that only talk to the services over REST: sites, federations, jobs.

Operator commands read the operator credential from ``FEDHE_OPERATOR_TOKEN`` (or the file
named by ``FEDHE_OPERATOR_TOKEN_FILE``); it is never accepted as a flag, so it stays out of
shell history and process listings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fedhe.cli.output import Column, emit_listing, print_json
from fedhe.errors import InvalidRequest
from fedhe.schemas import RoundPublic


def operator_token() -> str:
    """The operator credential from the environment (never a flag)."""
    token = os.environ.get("FEDHE_OPERATOR_TOKEN")
    path = os.environ.get("FEDHE_OPERATOR_TOKEN_FILE")
    if not token and path:
        token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise InvalidRequest("set FEDHE_OPERATOR_TOKEN or FEDHE_OPERATOR_TOKEN_FILE for operator commands")
    return token


def require(args: argparse.Namespace, *names: str) -> None:
    """Refuse a command missing one of ``names``, naming the flags to add."""
    missing = [name for name in names if getattr(args, name, None) in (None, "")]
    if missing:
        flags = ", ".join(name if name.endswith("_id") else "--" + name.replace("_", "-") for name in missing)
        raise InvalidRequest(f"{args.command} {args.action} needs {flags}")


def round_accuracy(round_: RoundPublic) -> float | None:
    """The sample-weighted accuracy of a round's published model across the sites that evaluated it."""
    examples = sum(e.num_examples for e in round_.evaluations if "accuracy" in e.metrics)
    if not examples:
        return None
    return sum(e.metrics["accuracy"] * e.num_examples for e in round_.evaluations if "accuracy" in e.metrics) / examples


def round_seconds(round_: RoundPublic) -> float | None:
    """How long a round took from opening to publication."""
    return (round_.published_at - round_.opened_at).total_seconds() if round_.published_at else None


SITE_COLUMNS = [
    Column("id", lambda s: s.id),
    Column("name", lambda s: s.name),
    Column("organisation", lambda s: s.organisation),
    Column("status", lambda s: s.status),
    Column("registered", lambda s: s.created_at),
]
JOB_COLUMNS = [
    Column("id", lambda j: j.id),
    Column("name", lambda j: j.name),
    Column("status", lambda j: j.status),
    Column("round", lambda j: f"{j.current_round}/{j.rounds}"),
    Column("parameters", lambda j: j.num_parameters),
    Column("created", lambda j: j.created_at),
]
ROUND_COLUMNS = [
    Column("round", lambda r: r.number),
    Column("attempt", lambda r: r.attempt),
    Column("state", lambda r: r.state),
    Column("sites", lambda r: r.num_submissions),
    Column("samples", lambda r: r.total_samples),
    Column("global accuracy", round_accuracy),
    Column("bytes up", lambda r: sum(s.num_bytes for s in r.submissions)),
    Column("seconds", round_seconds),
]


def _site(args: argparse.Namespace) -> None:
    from fedhe.api_client import AggregatorClient

    if args.action == "register":
        from fedhe.auth import generate_signing_key, private_key_to_pem, public_key_b64
        from fedhe.schemas import SiteCreate

        require(args, "name", "organisation", "contact")
        key_path = Path(args.key_out)
        if key_path.exists():
            raise InvalidRequest(f"{key_path} exists; refusing to overwrite a signing key")
        key = generate_signing_key()
        request = SiteCreate(
            name=args.name, organisation=args.organisation, contact=args.contact, public_key=public_key_b64(key)
        )
        with AggregatorClient(args.aggregator) as client:
            site = client.register_site(request)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_key_to_pem(key))
        print_json(site)
        return
    with AggregatorClient(args.aggregator, operator_token()) as client:
        if args.action == "list":
            emit_listing(args.json, "sites", SITE_COLUMNS, client.sites())
        else:
            require(args, "site_id")
            print_json(getattr(client, f"{args.action}_site")(args.site_id))


def _federation(args: argparse.Namespace) -> None:
    from fedhe.api_client import KeyserverClient
    from fedhe.schemas import FederationCreate

    with KeyserverClient(args.keyserver, operator_token()) as client:
        if args.action == "create":
            require(args, "name")
            print_json(client.create_federation(FederationCreate(name=args.name)))
            return
        require(args, "federation_id")
        if args.action == "rotate":
            print_json(client.rotate_key(args.federation_id))
        else:
            print_json(client.federation(args.federation_id))


def _job(args: argparse.Namespace) -> None:
    from fedhe.api_client import AggregatorClient
    from fedhe.schemas import JobCreate

    with AggregatorClient(args.aggregator, operator_token()) as client:
        if args.action == "create":
            require(args, "spec")
            spec = JobCreate.model_validate_json(Path(args.spec).read_text(encoding="utf-8"))
            print_json(client.create_job(spec))
        elif args.action == "list":
            emit_listing(args.json, "jobs", JOB_COLUMNS, client.jobs())
        else:
            require(args, "job_id")
            if args.action == "status":
                print_json(client.job(args.job_id))
            elif args.action == "rounds":
                emit_listing(args.json, f"rounds of {args.job_id}", ROUND_COLUMNS, client.rounds(args.job_id))
            else:
                print_json(client.stop_job(args.job_id))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the REST commands: ``site``, ``federation``, ``job``."""
    site = sub.add_parser("site", help="register a site (site admin) or decide on one (operator)")
    site.add_argument("action", choices=["register", "list", "approve", "reject", "revoke"])
    site.add_argument("site_id", nargs="?")
    site.add_argument("--aggregator", default="http://127.0.0.1:8080")
    site.add_argument("--name")
    site.add_argument("--organisation")
    site.add_argument("--contact")
    site.add_argument("--key-out", default="site-signing-key.pem")
    site.add_argument("--json", action="store_true", help="print JSON instead of a table")
    site.set_defaults(func=_site)

    federation = sub.add_parser("federation", help="create, inspect or rotate a federation's key (operator)")
    federation.add_argument("action", choices=["create", "show", "rotate"])
    federation.add_argument("federation_id", nargs="?")
    federation.add_argument("--keyserver", default="http://127.0.0.1:8090")
    federation.add_argument("--name")
    federation.set_defaults(func=_federation)

    job = sub.add_parser("job", help="create and follow jobs (operator)")
    job.add_argument("action", choices=["create", "list", "status", "rounds", "stop"])
    job.add_argument("job_id", nargs="?")
    job.add_argument("--aggregator", default="http://127.0.0.1:8080")
    job.add_argument("--spec", help="job definition (JSON) for create")
    job.add_argument("--json", action="store_true", help="print JSON instead of a table")
    job.set_defaults(func=_job)
