"""``fedhe agent``, ``fedhe export`` and ``fedhe pretrain``: what runs TensorFlow."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError

from client_agent.outcomes import EXIT_CODES, OutcomeStatus, exit_code
from client_agent.quiet_tensorflow import import_tensorflow
from fedhe.cli.main import validation_lines
from fedhe.cli.output import print_json
from fedhe.errors import InvalidRequest
from fedhe.logs import configure_logging

if TYPE_CHECKING:
    from client_agent.data_check import DataCheck
    from client_agent.settings import DataSettings

S = TypeVar("S", bound="DataSettings")

_FLAGS = {
    "aggregator_url": "--aggregator",
    "keyserver_url": "--keyserver",
    "site_id": "--site-id",
    "credential_file": "--credential-file",
    "signing_key_file": "--signing-key",
    "data_path": "--data",
    "label_column": "--label-column",
    "column_map": "--column",
    "policy_file": "--policy",
    "state_dir": "--state-dir",
    "custom_modules": "--custom-module",
    "initial_weights_dir": "--initial-weights-dir",
    "job_id": "--job",
}
"""Each agent setting that a flag of ``fedhe agent`` (and ``export``, ``check-data``) also sets."""


def _tflite_flavours(value: str) -> tuple[str, ...]:
    """``--tflite float16,int8`` (or ``none``) as the flavours to convert."""
    flavours = () if value == "none" else tuple(part.strip() for part in value.split(","))
    unknown = [flavour for flavour in flavours if flavour not in ("float16", "int8")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown TFLite flavour {', '.join(unknown)}: use float16, int8 or none")
    return flavours


def _column_map(pairs: list[str] | None) -> dict[str, str] | None:
    """``--column FEATURE=COLUMN`` flags as the job-feature → site-column map."""
    if not pairs:
        return None
    mapping = {}
    for pair in pairs:
        feature, sep, column = pair.partition("=")
        if not sep or not feature or not column:
            raise InvalidRequest(f"--column {pair!r}: write it as JOB_FEATURE=SITE_COLUMN", code="invalid_flag")
        mapping[feature] = column
    return mapping


def _settings(args: argparse.Namespace, kind: type[S]) -> S:
    """Agent settings (or only the data settings) from ``FEDHE_AGENT_*``, overridden by the flags given."""
    fields = {
        "aggregator_url": args.aggregator,
        "keyserver_url": args.keyserver,
        "site_id": args.site_id,
        "credential_file": args.credential_file,
        "signing_key_file": args.signing_key,
        "data_path": args.data,
        "label_column": args.label_column,
        "column_map": _column_map(args.columns),
        "policy_file": args.policy,
        "state_dir": args.state_dir,
        "custom_modules": args.custom_modules,
        "initial_weights_dir": args.initial_weights_dir,
        "job_id": getattr(args, "job", None),
        "once": getattr(args, "once", False) or None,
    }
    given = {k: v for k, v in fields.items() if v is not None and k in kind.model_fields}
    try:
        return kind(**given)
    except ValidationError as exc:
        raise InvalidRequest(
            "the agent's settings are incomplete or invalid:\n" + validation_lines(exc, _setting_name),
            code="invalid_settings",
        ) from exc


def _setting_name(field: str) -> str:
    """A settings field as the site admin sets it: its variable, and its flag where there is one."""
    flag = _FLAGS.get(field)
    return f"FEDHE_AGENT_{field.upper()}" + (f" ({flag})" if flag else "")


def _run(args: argparse.Namespace) -> int:
    if args.action == "check-data":
        return _check_data(args)
    import_tensorflow()
    from client_agent.agent import SiteAgent
    from client_agent.settings import AgentSettings

    settings = _settings(args, AgentSettings)
    configure_logging(settings.log_level, f"agent:{settings.site_id}")
    # As PID 1 in a container SIGTERM is ignored by default; exit promptly (the ledger and the
    # pending upload are written atomically, so stopping anywhere is safe).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcomes = SiteAgent(settings).run()
    print_json([{**o.__dict__, "exported_model": o.exported_model and str(o.exported_model)} for o in outcomes])
    return exit_code(outcomes)


def _check_data(args: argparse.Namespace) -> int:
    """``fedhe agent check-data``: every problem of the site's data for a job, before any round."""
    from client_agent.data_check import check_data
    from client_agent.policy import load_policy
    from client_agent.settings import AgentSettings, DataSettings
    from fedhe.schemas import JobCreate

    if (args.spec is None) == (args.job is None):
        raise InvalidRequest("check-data needs the job: --spec FILE (its definition) or --job JOB (ask the aggregator)")
    policy_file = args.policy
    if args.spec is not None:
        job = JobCreate.model_validate_json(args.spec.read_text(encoding="utf-8"))
        settings: DataSettings = _settings(args, DataSettings)
    else:
        agent_settings = _settings(args, AgentSettings)
        with agent_settings.aggregator_client() as aggregator:
            job = aggregator.job(args.job)
        settings, policy_file = agent_settings, agent_settings.policy_file
    delta = load_policy(policy_file).tighten(job.dp).delta
    report = check_data(settings, job, delta)
    if args.json:
        print_json({**report.__dict__, "fits": report.fits})
    else:
        _print_check(report, job.name)
    return 0 if report.fits else EXIT_CODES[OutcomeStatus.DATA_PROBLEM]


def _print_check(report: DataCheck, job_name: str) -> None:
    for warning in report.warnings:
        print(f"warning: {warning}")
    if not report.fits:
        print(f"{report.source} does not fit job {job_name!r}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            print(f"  - {problem}")
        return
    print(
        f"{report.source} fits job {job_name!r}: {report.training_rows} training and "
        f"{report.validation_rows} validation rows"
    )
    print("  rows per class: " + ", ".join(f"{name} {count}" for name, count in report.class_counts.items()))


def _export(args: argparse.Namespace) -> int:
    import_tensorflow()
    from client_agent.agent import SiteAgent
    from client_agent.settings import AgentSettings

    settings = _settings(args, AgentSettings)
    configure_logging(settings.log_level, f"export:{settings.site_id}")
    agent = SiteAgent(settings)
    exported = agent.export(args.job_id, args.out or settings.state_dir / f"{args.job_id}-export", args.tflite)
    for check in exported.tflite:
        print(check.summary(), file=sys.stderr)
    print_json(
        {
            "job_id": args.job_id,
            "files": [str(p) for p in exported.files()],
            "refused": [check.flavour for check in exported.tflite if not check.kept],
            "report": str(exported.report),
        }
    )
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import_tensorflow()
    from client_agent.datasets import load_dataset
    from client_agent.pretraining import pretrain
    from fedhe.errors import InvalidRequest
    from fedhe.schemas import JobCreate

    if args.out.suffix != ".keras":
        raise InvalidRequest(f"--out {args.out}: pre-trained models are written as .keras files")
    spec = JobCreate.model_validate_json(args.spec.read_text(encoding="utf-8")).model
    data = load_dataset(args.data, args.label_column, spec.data_schema())
    done = pretrain(
        spec, data, args.out, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate
    )
    print_json({**done.__dict__, "path": str(done.path)})
    return 0


def _site_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", "--server-address", dest="aggregator")
    parser.add_argument("--keyserver")
    parser.add_argument("--site-id", "--client-id", dest="site_id")
    parser.add_argument("--credential-file", type=Path)
    parser.add_argument("--signing-key", type=Path)
    parser.add_argument("--data", "--data-path", dest="data", help="CSV, NPZ, an image folder or sklearn:NAME")
    parser.add_argument("--label-column")
    parser.add_argument(
        "--column",
        dest="columns",
        action="append",
        metavar="FEATURE=COLUMN",
        help="the site's column for a job feature named otherwise (repeat for several)",
    )
    parser.add_argument("--policy", type=Path, help="site privacy policy (JSON)")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument(
        "--custom-module",
        dest="custom_modules",
        action="append",
        help="a module jobs' custom models may be imported from (repeat for several)",
    )
    parser.add_argument(
        "--initial-weights-dir",
        type=Path,
        help="weights this site holds (.keras, .h5, .npy), used instead of a download",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Contribute ``fedhe agent`` and ``fedhe export`` to the command line."""
    agent = sub.add_parser(
        "agent",
        help="run a site's agent (settings from FEDHE_AGENT_* or flags); 'agent check-data' checks the data first",
    )
    agent.add_argument(
        "action",
        nargs="?",
        choices=("run", "check-data"),
        default="run",
        help="run (the default) takes part in jobs; check-data lists every problem of the site's data for a job",
    )
    _site_flags(agent)
    agent.add_argument("--job", help="follow only this job (check-data: the job to check against)")
    agent.add_argument("--spec", type=Path, help="check-data: the job's definition (JSON) instead of --job")
    agent.add_argument("--json", action="store_true", help="check-data: print the report as JSON")
    agent.add_argument(
        "--once",
        action="store_true",
        help="exit after one job ends; the exit code says how (client_agent/outcomes.py, docs/site-admin-guide.md)",
    )
    agent.set_defaults(func=_run)
    export = sub.add_parser(
        "export",
        help="a member site writes a completed job's model: .keras, SavedModel, TFLite float16 and int8 (checked)",
    )
    export.add_argument("job_id", metavar="JOB")
    export.add_argument("--out", type=Path, help="directory to write to (default: STATE_DIR/JOB-export)")
    export.add_argument(
        "--tflite",
        type=_tflite_flavours,
        default=("float16", "int8"),
        metavar="FLAVOURS",
        help="TFLite flavours to convert and check: float16,int8 (the default), one of them, or none",
    )
    _site_flags(export)
    export.set_defaults(func=_export)
    pretrain = sub.add_parser(
        "pretrain",
        help="train a job's model without DP on public data (never a site's): the .keras file a job starts from",
    )
    pretrain.add_argument("--spec", type=Path, required=True, help="the job definition (JSON) whose model to train")
    pretrain.add_argument("--data", required=True, help="public data: CSV, NPZ, an image folder or sklearn:NAME")
    pretrain.add_argument("--label-column", default="label")
    pretrain.add_argument("--out", type=Path, required=True, help="the .keras file to write (0600)")
    pretrain.add_argument("--epochs", type=int, default=5)
    pretrain.add_argument("--batch-size", type=int, default=64)
    pretrain.add_argument("--learning-rate", type=float, default=1e-3)
    pretrain.set_defaults(func=_pretrain)
