"""e2e fixtures: the amd64 fleet that test_site_refusals.py and test_driver_install.py share (in that
order: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e.site_runs import SharedSiteFleet


@pytest.fixture(scope="session")
def shared_site_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedSiteFleet]:
    shared = SharedSiteFleet(tmp_path_factory.mktemp("shared-site"))
    try:
        yield shared
    finally:
        shared.down()

