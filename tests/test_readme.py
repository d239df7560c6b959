"""The README is the front door: it must show the test command CI runs and document every config key."""
import re
from dataclasses import fields
from pathlib import Path

import nested_reft as nr

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in fields(nr.Config) if f"| `{f.name}` |" not in readme]
    assert not missing, f"README.md 'Configuration reference' lacks: {missing}"


def test_readme_config_table_has_the_true_defaults_and_no_stale_key():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `(.*?)` \|", readme, flags=re.M))
    defaults = {f.name: repr(f.default) for f in fields(nr.Config)}
    assert {k: v for k, v in rows.items() if k in defaults and v != defaults[k]} == {}
    assert sorted(set(rows) - set(defaults)) == []


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in readme and "python -m pytest -q tests" in ci
    assert "torch==2.13.0" in ci


def test_the_readme_download_folders_are_git_ignored():
    """The README downloads the checkpoints and datasets into checkpoints/ and data/ inside the clone: multi-GB
    files that `git status` must not list (nor `git add -A` pick up)."""
    readme, ignored = (ROOT / "README.md").read_text(), (ROOT / ".gitignore").read_text().split()
    for folder in ("checkpoints/", "data/"):
        assert f" {folder}" in readme and folder in ignored, folder
