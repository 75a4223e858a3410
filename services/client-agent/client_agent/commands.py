"""``fedhe agent``: run a site's agent."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from client_agent.outcomes import exit_code
from fedhe.cli.output import print_json
from fedhe.logs import configure_logging


def _run(args: argparse.Namespace) -> int:
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
    configure_logging(settings.log_level, f"agent:{settings.site_id}")
    # As PID 1 in a container SIGTERM is ignored by default; exit promptly (the ledger and the
    # pending upload are written atomically, so stopping anywhere is safe).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcomes = SiteAgent(settings).run()
    print_json([{**o.__dict__, "exported_model": o.exported_model and str(o.exported_model)} for o in outcomes])
    return exit_code(outcomes)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Contribute ``fedhe agent`` to the command line."""
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
    agent.add_argument(
        "--once",
        action="store_true",
        help="exit after one job ends; the exit code says how (client_agent/outcomes.py, docs/site-admin-guide.md)",
    )
    agent.set_defaults(func=_run)
