"""The README documents every setting with its real default."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    head = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make serve" in head and "make test" in head


def test_readme_configuration_table_lists_every_setting():
    for name, field in Settings.model_fields.items():
        row = f"| `SURROGATE_{name.upper()}` | `{field.default}` |"
        assert row in README, f"README lacks {row}"


def test_readme_lists_every_surrogate():
    import surrogate_core as sc

    for name in sc.names():
        assert f"| `{name}` | `{sc.get(name).braintools_name}` |" in README
