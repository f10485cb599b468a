"""Every role documents its whole public API: argument_specs options == defaults keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support import REPO_ROOT

ROLES_DIR = REPO_ROOT / "roles"
ROLES = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "tasks").is_dir())


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_cover_every_default(role: str) -> None:
    defaults = _load(ROLES_DIR / role / "defaults" / "main.yml")
    specs = _load(ROLES_DIR / role / "meta" / "argument_specs.yml")["argument_specs"]
    documented = set(specs["main"]["options"])
    assert documented == set(defaults), (
        f"{role}: undocumented defaults {sorted(set(defaults) - documented)}, "
        f"documented but not defaulted {sorted(documented - set(defaults))}"
    )


@pytest.mark.parametrize("role", ROLES)
def test_every_entry_point_accepts_the_same_options(role: str) -> None:
    specs = _load(ROLES_DIR / role / "meta" / "argument_specs.yml")["argument_specs"]
    main_options = set(specs["main"]["options"])
    for entry_point, spec in specs.items():
        options = set(spec.get("options", {}))
        assert options == main_options, f"{role}: entry point {entry_point} differs from main"


@pytest.mark.parametrize("role", ROLES)
def test_public_variables_carry_the_role_prefix(role: str) -> None:
    defaults = _load(ROLES_DIR / role / "defaults" / "main.yml")
    vars_file = ROLES_DIR / role / "vars" / "main.yml"
    internals = _load(vars_file) if vars_file.exists() else {}
    assert all(name.startswith(f"{role}_") for name in defaults), sorted(defaults)
    assert all(name.startswith(f"_{role}_") for name in internals), sorted(internals)
