"""The release files (LICENSE, CITATION.cff, CHANGELOG.md, pyproject's
metadata) agree with each other and with the package, and the README opens
with the two commands that CI runs (.ci/readme_commands.py).

CI itself builds the wheel and sdist, checks them with `twine check
--strict`, installs the wheel into a fresh virtual environment and trains
from it (.ci/run).
"""

import importlib.util
import pathlib
import re
import tomllib

import pytest
import yaml

import keras_mwbp

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAPER_TITLE = (
    "Multi-way backpropagation for training compact deep neural networks"
)


def _readme_commands_module():
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci" / "readme_commands.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_license_is_apache_2_and_declared_so():
    text = (ROOT / "LICENSE").read_text()
    assert text.split("\n")[:2] == [
        " " * 33 + "Apache License",
        " " * 27 + "Version 2.0, January 2004",
    ]
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def test_citation_cites_the_paper_and_this_version():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert citation["type"] == "software"
    assert citation["version"] == keras_mwbp.__version__
    assert citation["license"] == "Apache-2.0"
    assert {"message", "title", "authors"} <= set(citation)
    paper = citation["preferred-citation"]
    assert paper["title"] == PAPER_TITLE
    assert paper["journal"] == "Neural Networks"
    assert paper["year"] == 2020
    assert [a["family-names"] for a in paper["authors"]] == [
        "Guo", "Chen", "Du", "Hengel", "Shi", "Tan"
    ]


def test_changelog_has_every_version_newest_first():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+) - ", text, re.M)
    assert versions == ["0.2.0", "0.1.0"]
    assert versions[0] == keras_mwbp.__version__
    # The release date of the current version is the citation's.
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert f"## {versions[0]} - {citation['date-released']}" in text


def test_readme_opens_with_the_two_commands_ci_runs():
    module = _readme_commands_module()
    commands = module.readme_commands((ROOT / "README.md").read_text())
    assert commands == [
        "pip install . && keras-mwbp train",
        "pip install '.[test]' && bash tests/run_all.sh",
    ]


@pytest.mark.parametrize("text, message", [
    ("# Title\n\nNo block here.\n", "The README has no ```bash block."),
    ("```bash\n# only a comment\n```\n",
     "The README's first ```bash block has no command."),
])
def test_readme_commands_refuses_a_readme_without_them(text, message):
    module = _readme_commands_module()
    with pytest.raises(ValueError) as raised:
        module.readme_commands(text)
    assert str(raised.value) == message


def test_readme_commands_drops_comments_and_keeps_quoted_hashes():
    module = _readme_commands_module()
    text = ("intro\n```bash\nrun a   # first\n\necho '#x' && b  # second\n"
            "```\n```bash\nlater\n```\n")
    assert module.readme_commands(text) == ["run a", "echo '#x' && b"]
