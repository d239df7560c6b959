"""The README is the front door: it must show the test command CI runs, document every config key and cite (like
bench/README.md) only functions, attributes and tests that exist."""
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


DOCS = ("README.md", "bench/README.md")
MODULES = ("nested_reft", "qwen2", "grpo", "data", "eval", "distributed", "demo")
WORD = r"\w*"


def _code_spans(doc: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text())


def test_the_readmes_cite_only_names_that_exist():
    """Every `module.name[.attr]` the READMEs cite in backticks resolves (e.g. `grpo.offpolicy_weight`,
    `nested_reft.SkipSampler.next`); file names such as `eval.py` or `eval.jsonl` are not names."""
    import importlib
    cited = re.compile(r"(?<![\w./])(%s)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)" % "|".join(MODULES))
    missing, checked = [], 0
    for doc in DOCS:
        for span in _code_spans(doc):
            for mod, path in cited.findall(span):
                if path.split(".")[0] in ("py", "json", "jsonl", "md"):
                    continue
                obj, checked = importlib.import_module(mod), checked + 1
                for attr in path.split("."):
                    if not hasattr(obj, attr):
                        missing.append(f"{doc}: {mod}.{path}")
                        break
                    obj = getattr(obj, attr)
    assert missing == [] and checked >= 50


def test_the_readmes_cite_only_tests_that_exist():
    """Every test the READMEs name in backticks is defined: `test_name` (a trailing * a prefix) in some tests/ file,
    `tests/test_file.py::test_name` in that file."""
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    missing, checked = [], 0
    for doc in DOCS:
        for span in _code_spans(doc):
            for file, name, star in re.findall(r"(?:tests/(test_\w+\.py)::)?\b(test_\w+)(\*?)(?!\w|\.py)", span):
                if file and file not in sources:
                    missing.append(f"{doc}: tests/{file}")
                    continue
                pattern, checked = re.compile(rf"^def {name}{WORD if star else ''}\(", re.M), checked + 1
                if not any(pattern.search(src) for f, src in sources.items() if not file or f == file):
                    missing.append(f"{doc}: {span}")
    assert missing == [] and checked >= 20
