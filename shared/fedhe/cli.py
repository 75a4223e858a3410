"""The ``fedhe`` command: run a service, an agent or the demo; manage sites, federations, jobs.

Operator commands read the operator credential from ``FEDHE_OPERATOR_TOKEN`` (or the file
named by ``FEDHE_OPERATOR_TOKEN_FILE``); it is never accepted as a flag, so it stays out of
shell history and process listings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedhe.errors import FedheError, InvalidRequest
from fedhe.settings import ServiceSettings


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _operator_token() -> str:
    token = os.environ.get("FEDHE_OPERATOR_TOKEN")
    path = os.environ.get("FEDHE_OPERATOR_TOKEN_FILE")
    if not token and path:
        token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise InvalidRequest("set FEDHE_OPERATOR_TOKEN or FEDHE_OPERATOR_TOKEN_FILE for operator commands")
    return token


def _print(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    print(json.dumps(value, indent=2, default=str))


def _service_settings(service: str, args: argparse.Namespace, flags: Sequence[str]) -> ServiceSettings:
    """The service's settings from ``FEDHE_<SERVICE>_*``, with the given flags winning."""
    if service == "keyserver":
        from keyserver.settings import KeyserverSettings

        return KeyserverSettings(**_overrides(args, flags))
    from aggregator.settings import AggregatorSettings

    return AggregatorSettings(**_overrides(args, flags))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn
    from fastapi import FastAPI

    from aggregator.settings import AggregatorSettings

    settings = _service_settings(args.command, args, ("host", "port", "database_url"))
    _configure_logging(settings.log_level)
    app: FastAPI
    if isinstance(settings, AggregatorSettings):
        from aggregator.app import create_app as create_aggregator

        app = create_aggregator(settings)
    else:
        from keyserver.app import create_app as create_keyserver
        from keyserver.settings import KeyserverSettings

        assert isinstance(settings, KeyserverSettings)
        app = create_keyserver(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [name for name in names if getattr(args, name, None) in (None, "")]
    if missing:
        flags = ", ".join(name if name.endswith("_id") else "--" + name.replace("_", "-") for name in missing)
        raise InvalidRequest(f"{args.command} {args.action} needs {flags}")


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _agent(args: argparse.Namespace) -> None:
    from client_agent.agent import SiteAgent
    from client_agent.settings import AgentSettings

    fields = {
        "aggregator_url": args.aggregator,
        "keyserver_url": args.keyserver,
        "site_id": args.site_id,
        "credential_file": args.credential_file,
        "signing_key_file": args.signing_key,
        "data_path": args.data,
        "label_column": args.label_column,
        "policy_file": args.policy,
        "state_dir": args.state_dir,
        "job_id": args.job,
        "once": args.once or None,
    }
    settings = AgentSettings(**{k: v for k, v in fields.items() if v is not None})
    _configure_logging(settings.log_level)
    # As PID 1 in a container SIGTERM is ignored by default; exit promptly (the ledger and the
    # pending upload are written atomically, so stopping anywhere is safe).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcomes = SiteAgent(settings).run()
    _print([{**o.__dict__, "exported_model": str(o.exported_model) if o.exported_model else None} for o in outcomes])


def _site(args: argparse.Namespace) -> None:
    from fedhe.api_client import AggregatorClient

    if args.action == "register":
        from fedhe.auth import generate_signing_key, private_key_to_pem, public_key_b64
        from fedhe.schemas import SiteCreate

        _require(args, "name", "organisation", "contact")
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
        _print(site)
        return
    with AggregatorClient(args.aggregator, _operator_token()) as client:
        if args.action == "list":
            _print(client.sites())
        else:
            _require(args, "site_id")
            _print(getattr(client, f"{args.action}_site")(args.site_id))


def _federation(args: argparse.Namespace) -> None:
    from fedhe.api_client import KeyserverClient
    from fedhe.schemas import FederationCreate

    with KeyserverClient(args.keyserver, _operator_token()) as client:
        if args.action == "create":
            _require(args, "name")
            _print(client.create_federation(FederationCreate(name=args.name)))
            return
        _require(args, "federation_id")
        if args.action == "rotate":
            _print(client.rotate_key(args.federation_id))
        else:
            _print(client.federation(args.federation_id))


def _job(args: argparse.Namespace) -> None:
    from fedhe.api_client import AggregatorClient
    from fedhe.schemas import JobCreate

    with AggregatorClient(args.aggregator, _operator_token()) as client:
        if args.action == "create":
            _require(args, "spec")
            spec = JobCreate.model_validate_json(Path(args.spec).read_text(encoding="utf-8"))
            _print(client.create_job(spec))
            return
        if args.action == "list":
            _print(client.jobs())
            return
        _require(args, "job_id")
        if args.action == "status":
            _print(client.job(args.job_id))
        elif args.action == "rounds":
            _print(client.rounds(args.job_id))
        else:
            _print(client.stop_job(args.job_id))


def _demo(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides the table
    from fedhe.demo import DemoOptions, run_demo

    _configure_logging("WARNING")
    options = DemoOptions(
        dataset=args.dataset,
        rounds=args.rounds,
        num_sites=args.sites,
        alpha=args.alpha,
        seed=args.seed,
        workdir=Path(args.workdir) if args.workdir else None,
        report=Path(args.report) if args.report else None,
        noise_multiplier=args.noise_multiplier,
        local_epochs=args.local_epochs,
    )
    run_demo(options)


def _db(args: argparse.Namespace) -> None:
    from fedhe.migrations import upgrade

    settings = _service_settings(args.service, args, ("database_url",))
    upgrade(settings.database_url, args.service, args.revision)
    print(f"{args.service} database is at revision {args.revision}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedhe`` command."""
    parser = argparse.ArgumentParser(prog="fedhe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, port in (("keyserver", 8090), ("aggregator", 8080)):
        serve = sub.add_parser(name, help=f"run the {name} (settings from FEDHE_{name.upper()}_*)")
        serve.add_argument("--host")
        serve.add_argument("--port", type=int, help=f"listen port (default {port})")
        serve.add_argument("--database-url", dest="database_url")
        serve.set_defaults(func=_serve)

    agent = sub.add_parser("agent", help="run a site's agent (settings from FEDHE_AGENT_* or flags)")
    agent.add_argument("--aggregator", "--server-address", dest="aggregator")
    agent.add_argument("--keyserver")
    agent.add_argument("--site-id", "--client-id", dest="site_id")
    agent.add_argument("--credential-file", type=Path)
    agent.add_argument("--signing-key", type=Path)
    agent.add_argument("--data", "--data-path", dest="data", help="CSV, NPZ or sklearn:NAME")
    agent.add_argument("--label-column")
    agent.add_argument("--policy", type=Path, help="site privacy policy (JSON)")
    agent.add_argument("--state-dir", type=Path)
    agent.add_argument("--job", help="follow only this job")
    agent.add_argument("--once", action="store_true", help="exit after one job ends")
    agent.set_defaults(func=_agent)

    site = sub.add_parser("site", help="register a site (site admin) or decide on one (operator)")
    site.add_argument("action", choices=["register", "list", "approve", "reject", "revoke"])
    site.add_argument("site_id", nargs="?")
    site.add_argument("--aggregator", default="http://127.0.0.1:8080")
    site.add_argument("--name")
    site.add_argument("--organisation")
    site.add_argument("--contact")
    site.add_argument("--key-out", default="site-signing-key.pem")
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
    job.set_defaults(func=_job)

    db = sub.add_parser("db", help="database schema migrations")
    db.add_argument("action", choices=["upgrade"])
    db.add_argument("--service", choices=["aggregator", "keyserver"], required=True)
    db.add_argument("--database-url", help="default: the service's FEDHE_<SERVICE>_DATABASE_URL")
    db.add_argument("--revision", default="head")
    db.set_defaults(func=_db)

    demo = sub.add_parser("demo", help="run a whole federation on this machine and report accuracy")
    demo.add_argument("--dataset", default="breast_cancer", choices=["breast_cancer", "digits"])
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--sites", type=int, default=3)
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID concentration")
    demo.add_argument("--noise-multiplier", type=float, default=None, help="DP-SGD noise (default: the preset's)")
    demo.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default: the preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workdir")
    demo.add_argument("--report", help="write the report as JSON here")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedhe`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FedheError as exc:
        print(f"fedhe: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"fedhe: invalid input: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedhe: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
