"""Settings documentation stays complete: every field documented, .env.example and the
README list exactly the settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings_doc import documented_settings, env_example, with_table

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_a_docstring() -> None:
    """Each Settings field carries a docstring under it (its documentation)."""
    missing = [s.field for s in documented_settings() if not s.doc]
    assert missing == []


def test_env_example_lists_exactly_the_settings() -> None:
    """.env.example names every VIGIL_* setting and no other."""
    listed = set(re.findall(r"^(VIGIL_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert listed == {s.env for s in documented_settings()}


def test_env_example_is_generated_from_the_docstrings() -> None:
    """.env.example is exactly `vigil settings env-example` (regenerate it when a setting changes)."""
    assert (ROOT / ".env.example").read_text().strip() == env_example().strip()


def test_readme_settings_table_is_generated() -> None:
    """The README's settings table is exactly the generated one (`make settings-docs`)."""
    readme = (ROOT / "README.md").read_text()
    assert readme == with_table(readme)
    assert [s.env for s in documented_settings() if f"`{s.env}`" not in readme] == []
