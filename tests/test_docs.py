"""The generated CLI reference matches the parsers, and the README stays short."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_generated_from_the_parsers():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_readme_is_short_and_links_the_docs():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode()) <= 12_500
    for page in ("docs/cli.md", "docs/tools.md", "docs/methods.md", "docs/performance.md", "docs/formats.md"):
        assert page in text and os.path.isfile(os.path.join(ROOT, page)), page
