"""Fast checks of the simulator's pure parts (no root, no containers)."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from . import network
from .commands import SimError
from .fixtures import board_hardware, parse_overrides
from .inventory import to_yaml
from .mirror import model_name


def test_inventory_yaml_round_trips_awkward_values() -> None:
    tree = {"all": {"vars": {"args": "-o A=b -o 'C: d'", "flag": False, "count": 3, "empty": {},
                             "nested": {"Qwen2.5-1.5B-Instruct": {"url": "http://10.1.2.1:80/m#x"}}}}}
    assert yaml.safe_load(to_yaml(tree)) == tree


def test_overrides_accept_short_and_long_board_names() -> None:
    assert parse_overrides(["b2=0.9.6", "board3=8192"], boards=3) == {2: "0.9.6", 3: "8192"}
    hardware = board_hardware(3, {2: "0.9.6"}, {3: "8192"})
    assert hardware[2].files()["/srv/fixtures/rknpu/version"] == "RKNPU driver: v0.9.6\n"
    assert "MemTotal:        8388608 kB" in hardware[3].files()["/srv/fixtures/meminfo"]
    assert "MemTotal:       16777216 kB" in hardware[1].files()["/srv/fixtures/meminfo"]


@pytest.mark.parametrize(("pairs", "message"), [
    (["b4=0.9.6"], "unknown board 'b4': use b1..b3"),
    (["b2"], "expected BOARD=VALUE"),
])
def test_bad_overrides_are_refused(pairs: list[str], message: str) -> None:
    with pytest.raises(SimError, match=message):
        parse_overrides(pairs, boards=3)


def test_ram_must_be_mib() -> None:
    with pytest.raises(SimError, match="RAM must be a number of MiB"):
        board_hardware(1, {}, {1: "8G"})


def test_subnet_skips_networks_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    first = network.choose_subnet("rfx")
    monkeypatch.setattr(network, "_host_networks", lambda: [first, ipaddress.IPv4Network("10.64.0.0/16")])
    second = network.choose_subnet("rfx")
    assert second != first
    assert not second.overlaps(ipaddress.IPv4Network("10.64.0.0/16"))
    assert second.subnet_of(ipaddress.IPv4Network("10.64.0.0/10"))


def test_model_name_comes_from_the_name_line(tmp_path) -> None:
    model = tmp_path / "q.rkllm"
    model.write_text("# c\nformat = rkllm-double/1\nname = Qwen2.5-1.5B-Instruct   # note\n")
    assert model_name(model) == "Qwen2.5-1.5B-Instruct"
    bare = tmp_path / "bare.rkllm"
    bare.write_text("format = rkllm-double/1\n")
    assert model_name(bare) == "bare"
