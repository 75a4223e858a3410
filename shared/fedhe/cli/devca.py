"""``fedhe dev-ca``: a local CA and certificates, so a trial on one machine runs over TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedhe.devca import DevCA, create_ca


def _run(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    ca = DevCA(directory / "ca.pem", directory / "ca-key.pem")
    if not ca.cert_file.exists():
        ca = create_ca(directory)
        print(f"created CA {ca.cert_file} (trust it with FEDHE_CA_FILE / *_TLS_CA_FILE)")
    server = ca.issue(directory, "server", hosts=args.hosts.split(","))
    print(f"server certificate {server.cert_file}, key {server.key_file} for {args.hosts}")
    for name in filter(None, args.clients.split(",")):
        client = ca.issue(directory, name, client=True)
        print(f"client certificate {client.cert_file}, key {client.key_file}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedhe dev-ca``."""
    parser = sub.add_parser("dev-ca", help="make a local CA and TLS certificates for a trial on one machine")
    parser.add_argument("--dir", default="fedhe-tls", help="where to write the CA, certificates and keys")
    parser.add_argument("--hosts", default="127.0.0.1,localhost", help="server names and addresses (comma-separated)")
    parser.add_argument("--clients", default="", help="client certificates to issue for mutual TLS (comma-separated)")
    parser.set_defaults(func=_run)
