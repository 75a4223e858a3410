"""Settings conventions shared by the services' own settings classes.

Each service declares one ``BaseSettings`` subclass in its own package (``keyserver.settings``,
``aggregator.settings``, ``client_agent.settings``). They share these rules: every field can be
set by an environment variable ``FEDHE_<SERVICE>_<FIELD>``; secrets are ``SecretStr`` with no
default (never printed, never in the repository); a secret may instead be read from a file
named by ``..._FILE``, the usual way Kubernetes mounts Secrets.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from fedhe.errors import InvalidRequest


def resolve_secret(value: SecretStr | None, file: Path | None, name: str) -> SecretStr:
    """The secret given directly or in a file; it is an error to give neither or both."""
    if value is not None and file is not None:
        raise InvalidRequest(f"give {name} or {name}_file, not both")
    if file is not None:
        text = file.read_text(encoding="utf-8").strip()
        if not text:
            raise InvalidRequest(f"{name}_file {file} is empty")
        return SecretStr(text)
    if value is None or not value.get_secret_value():
        raise InvalidRequest(f"{name} is required (set it directly or through {name}_file)")
    return value
