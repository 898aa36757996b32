"""The README's result tables are ``tools/readme_tables.py``'s output for the committed H200 files, line
for line: a new result file without a refreshed README (or a hand edit of a number) fails here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_the_files():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_tables.py")], capture_output=True, text=True,
                         check=True).stdout
    readme = (ROOT / "README.md").read_text().splitlines()
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) > 20
    missing = [line for line in lines if line not in readme]
    assert not missing, "README.md lacks these lines of `python tools/readme_tables.py` (rerun it):\n" + "\n".join(
        missing)
