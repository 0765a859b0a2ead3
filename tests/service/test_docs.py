"""The documentation documents every setting with its real default, and every surrogate."""

from __future__ import annotations

from pathlib import Path

from service.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
SURROGATES = (ROOT / "docs" / "surrogates.md").read_text()


def test_readme_starts_with_the_two_commands():
    head = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make serve" in head and "make test" in head


def test_configuration_table_lists_every_setting():
    for name, field in Settings.model_fields.items():
        row = f"| `SURROGATE_{name.upper()}` | `{field.default}` |"
        assert row in CONFIGURATION, f"docs/configuration.md lacks {row}"


def test_configuration_table_lists_no_setting_that_does_not_exist():
    documented = {line.split("`")[1] for line in CONFIGURATION.splitlines() if line.startswith("| `SURROGATE_")}
    assert documented == {f"SURROGATE_{name.upper()}" for name in Settings.model_fields}


def test_surrogate_table_lists_every_surrogate():
    import surrogate_core as sc

    for name in sc.names():
        assert f"| `{name}` | `{sc.get(name).braintools_name}` |" in SURROGATES
    rows = [line for line in SURROGATES.splitlines() if line.startswith("| `") and not line.startswith("| `surrogate`")]
    assert len(rows) == len(sc.names())
