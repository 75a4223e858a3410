"""``fedhe agent check-data --spec``: every problem of a site's data for a job, listed at once,
with the exit status the agent gives a data problem; nothing needs the services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client_agent.outcomes import EXIT_CODES, OutcomeStatus
from fedhe.cli.main import main

EXIT_DATA_PROBLEM = EXIT_CODES[OutcomeStatus.DATA_PROBLEM]
KEY_ID = "key-" + "0" * 32


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    job = {
        "name": "wine",
        "key_id": KEY_ID,
        "min_sites": 3,
        "batch_size": 32,
        "dp": {"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-3},
        "model": {
            "architecture": "mlp",
            "input_shape": [3],
            "num_classes": 3,
            "class_names": ["barolo", "grignolino", "barbera"],
            "feature_names": ["alcohol", "malic_acid", "ash"],
        },
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    return path


def _rows(count: int) -> str:
    return "".join(f"{'barolo' if i % 2 else 'barbera'};2020-01-{i + 1:02d};13,{i};1,7;2,4\n" for i in range(count))


def test_check_data_lists_every_problem_and_exits_as_the_agent_would(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "site.csv"
    data.write_text(
        "cultivar;sample_date;Alcohol %;malic_acid;ash\n" + _rows(4) + "barolo;x;NaN;1,8;2,1\nmerlot;x;12,3;;2,0\n",
        encoding="utf-8",
    )
    flags = ["agent", "check-data", "--spec", str(spec), "--data", str(data), "--label-column", "cultivar"]
    assert main(flags) == EXIT_DATA_PROBLEM
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {data}: columns are separated by semicolons; decimal commas read as points",
        f"{data} does not fit job 'wine': 2 problem(s)",
        f"  - {data} lacks the job's feature columns alcohol",
        f"  - {data} has 2 feature columns, the job's model expects (3,)",
    ]
    assert main([*flags, "--column", "alcohol=Alcohol %"]) == EXIT_DATA_PROBLEM
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{data} does not fit job 'wine': 3 problem(s)",
        f"  - {data}: row 6, column 'Alcohol %': missing value",
        f"  - {data}: row 7, column 'malic_acid': missing value",
        f"  - {data}: row 7, column 'cultivar': label 'merlot' is not one of the job's classes "
        "(barolo, grignolino, barbera)",
    ]


def test_check_data_says_what_fits_and_refuses_what_the_agent_would_refuse(
    spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "site.csv"
    data.write_text("cultivar;sample_date;Alcohol %;malic_acid;ash\n" + _rows(200), encoding="utf-8")
    flags = ["agent", "check-data", "--spec", str(spec), "--data", str(data), "--label-column", "cultivar"]
    assert main([*flags, "--column", "alcohol=Alcohol %"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {data}: columns are separated by semicolons; decimal commas read as points",
        "warning: no rows of class grignolino (the site trains on the classes it has)",
        f"{data} fits job 'wine': 160 training and 40 validation rows",
        "  rows per class: barolo 100, grignolino 0, barbera 100",
    ]
    small = tmp_path / "small.csv"
    small.write_text("cultivar;sample_date;Alcohol %;malic_acid;ash\n" + _rows(20), encoding="utf-8")
    assert main(["agent", "check-data", "--spec", str(spec), "--data", str(small), "--label-column", "cultivar",
                 "--column", "alcohol=Alcohol %", "--json"]) == EXIT_DATA_PROBLEM  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False
    assert report["training_rows"] == 16
    assert report["problems"] == ["this site has 16 training rows, fewer than one batch of 32"]


def test_check_data_needs_one_job_and_agent_settings_are_named_as_the_admin_sets_them(
    spec: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("FEDHE_AGENT_SITE_ID", "FEDHE_AGENT_SIGNING_KEY_FILE", "FEDHE_AGENT_DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert main(["agent", "check-data", "--data", "x.csv"]) == 2
    assert "check-data needs the job: --spec FILE (its definition) or --job JOB" in capsys.readouterr().err
    assert main(["agent", "--once"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "fedhe: invalid_settings: the agent's settings are incomplete or invalid:",
        "  FEDHE_AGENT_DATA_PATH (--data): Field required",
        "  FEDHE_AGENT_SITE_ID (--site-id): Field required",
        "  FEDHE_AGENT_SIGNING_KEY_FILE (--signing-key): Field required",
    ]
