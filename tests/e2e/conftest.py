"""e2e fixtures: the amd64 fleet that test_site_refusals.py and test_driver_install.py share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e.site_runs import SharedSiteFleet

REFUSALS, DRIVER_INSTALL = "test_site_refusals.py", "test_driver_install.py"


@pytest.fixture(scope="session")
def shared_site_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedSiteFleet]:
    shared = SharedSiteFleet(tmp_path_factory.mktemp("shared-site"))
    try:
        yield shared
    finally:
        shared.down()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the driver install path right after the refusals, on the boards they provisioned (in the other
    order each module would boot a fleet of its own, as it does when run alone)."""
    driver = [item for item in items if item.path.name == DRIVER_INSTALL]
    others = [item for item in items if item.path.name != DRIVER_INSTALL]
    refusals = [index for index, item in enumerate(others) if item.path.name == REFUSALS]
    if driver and refusals:
        items[:] = others[:refusals[-1] + 1] + driver + others[refusals[-1] + 1:]
