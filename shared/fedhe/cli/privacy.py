"""``fedhe privacy plan``: ε per round for a job spec and a site size, before anything runs.

It prints the projection the aggregator stores with a job (``JobPublic.privacy_plan``), the
bytes a site's packed upload will cost (at the default BFV parameters) and the warnings it
would give, so operators and site admins can judge a job from its spec file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from fedhe.cli.output import Column, emit_listing
from fedhe.errors import InvalidRequest
from fedhe.job_planning import creation_warnings, privacy_plan, upload_cost
from fedhe.schemas import JobCreate


def _load_spec(path: Path) -> JobCreate:
    try:
        return JobCreate.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{path}: cannot read a JSON job spec: {exc}") from exc
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "the spec"
        raise InvalidRequest(f"{path}: {where}: {problem['msg']}") from exc


def _plan(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    samples = args.samples or spec.min_site_samples
    if samples is None:
        raise InvalidRequest(f"{args.spec}: give --samples or set min_site_samples in the spec")
    plan = privacy_plan(spec, samples)
    rows = [{"round": number, "epsilon": epsilon} for number, epsilon in enumerate(plan.epsilon_per_round, start=1)]
    title = f"ε per round (δ={plan.delta:g}, {samples} rows)"
    cost = upload_cost(spec)
    if args.json:
        upload = None if cost is None else cost.model_dump()
        print(json.dumps({**plan.model_dump(), "upload": upload, "warnings": creation_warnings(spec, plan)}, indent=2))
        return 0
    emit_listing(False, title, [Column("round", lambda r: r["round"]), Column("ε", lambda r: r["epsilon"])], rows)
    if cost is not None:
        print(
            f"upload: {cost.bits}-bit packing (R={cost.clip_range:g}, max_sites={cost.max_sites}) costs "
            f"{cost.bytes_per_parameter:.2f} bytes per parameter, {cost.upload_bytes:,} bytes per site and round "
            f"for {cost.num_values:,} values (default BFV parameters)"
        )
    for warning in creation_warnings(spec, plan):
        print(f"warning: {warning}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedhe privacy plan``."""
    privacy = sub.add_parser("privacy", help="plan a job's privacy cost before it runs")
    commands = privacy.add_subparsers(dest="privacy_command", required=True, metavar="COMMAND")
    plan = commands.add_parser("plan", help="ε per round for a job spec (JSON) and a site's number of training rows")
    plan.add_argument("spec", type=Path, metavar="JOB_SPEC.json")
    plan.add_argument("--samples", type=int, help="the site's training rows (default: the spec's min_site_samples)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.set_defaults(func=_plan)
