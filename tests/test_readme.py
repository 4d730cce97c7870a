"""README.md says what the project does; these keep it honest: CI runs README's test command
as written, the embedded example is the example file, and every table matches the committed
results it is generated from."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_readme_command_2_literally():
    readme = read("README.md")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    command2 = block.splitlines()[block.splitlines().index(
        "# 2. install and run the tests (CPU; Triton runs in its interpreter)") + 1]
    ci = read(".ci", "run").splitlines()
    assert command2 in ci, f".ci/run must run README's command 2 as written: {command2!r}"


def test_readme_example_is_the_example_file():
    readme = read("README.md")
    script = read("examples", "fsdp2_train.py")
    body = script[script.index("import argparse"):].strip()
    assert body in readme, "README's FSDP2 example differs from examples/fsdp2_train.py"


def test_readme_tables_match_committed_results():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "readme_tables.py"),
                           "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


DOCS = ["README.md", "perf/README.md", "docs/design.md", "docs/kernel.md",
        "docs/integrations.md", "docs/performance.md", "perf/results/h200/README.md"]


def test_readme_and_docs_links_point_into_the_repository():
    for doc in DOCS:
        text = read(doc)
        assert "DESIGN.md" not in text and "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
                assert os.path.exists(path), (doc, target)


def test_readme_is_for_users():
    """README for users (how to install, use, configure; one performance table), at most 300
    lines; the rest is in docs/."""
    assert len(read("README.md").splitlines()) <= 300
