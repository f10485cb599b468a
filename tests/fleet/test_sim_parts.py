"""Fast checks of the simulator's pure parts (no root, no containers)."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
import yaml

from . import network
from .commands import SimError
from .fixtures import board_hardware, parse_overrides
from .inventory import to_yaml
from .kernels import build_kernel_deb
from .mirror import model_name


def test_inventory_yaml_round_trips_awkward_values() -> None:
    tree = {"all": {"vars": {"args": "-o A=b -o 'C: d'", "flag": False, "count": 3, "empty": {},
                             "nested": {"Qwen2.5-1.5B-Instruct": {"url": "http://10.1.2.1:80/m#x"}}}}}
    assert yaml.safe_load(to_yaml(tree)) == tree


def test_overrides_accept_short_and_long_board_names() -> None:
    assert parse_overrides(["b2=0.9.6", "board3=8192"], boards=3) == {2: "0.9.6", 3: "8192"}
    hardware = board_hardware(3, {2: "0.9.6"}, {3: "8192"})
    kernel = hardware[2].files()["/boot/vmlinuz-6.1.43-fleetsim"]
    assert kernel == "fleet-sim kernel 6.1.43-fleetsim\nnpu rknpu 0.9.6\n"
    assert hardware[2].symlinks()["/srv/fixtures/rknpu"] == "../../run/fleet-sim-boot/rknpu"
    assert "MemTotal:        8388608 kB" in hardware[3].files()["/srv/fixtures/meminfo"]
    assert "MemTotal:       16777216 kB" in hardware[1].files()["/srv/fixtures/meminfo"]


@pytest.mark.parametrize(("pairs", "message"), [
    (["b4=0.9.6"], "unknown board 'b4': use b1..b3"),
    (["b2"], "expected BOARD=VALUE"),
])
def test_bad_overrides_are_refused(pairs: list[str], message: str) -> None:
    with pytest.raises(SimError, match=message):
        parse_overrides(pairs, boards=3)


def test_driver_is_a_version_or_rocket() -> None:
    assert "npu rocket" in board_hardware(1, {1: "rocket"}, {})[1].files()["/boot/vmlinuz-6.1.43-fleetsim"]
    with pytest.raises(SimError, match=r"rknpu version like 0\.9\.6 or 'rocket'"):
        board_hardware(1, {1: "v0.9"}, {})


def test_kernel_package_is_a_real_deb(tmp_path) -> None:
    deb = build_kernel_deb("6.1.84-fleetsim", "0.9.8", "arm64", tmp_path)
    fields = subprocess.run(["dpkg-deb", "--field", str(deb), "Package", "Architecture"],
                            capture_output=True, text=True, check=True).stdout
    assert fields == "Package: linux-image-6.1.84-fleetsim\nArchitecture: arm64\n"
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    assert "root/root" in listing and "./boot/vmlinuz-6.1.84-fleetsim" in listing
    extracted = tmp_path / "x"
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(extracted)], check=True)
    assert (extracted / "boot/vmlinuz-6.1.84-fleetsim").read_text().endswith("npu rknpu 0.9.8\n")


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
