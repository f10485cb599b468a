"""Fast checks of the simulator's pure parts (no root, no containers)."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from . import network
from .commands import SimError
from .fixtures import board_hardware, parse_overrides
from .inventory import to_yaml
from .kernels import build_kernel_deb
from .mirror import model_name
from .vendor_image import VENDOR_PASSWORD, VENDOR_SSHD_DROPIN, VENDOR_USER, install_vendor_login


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


def test_vendor_login_is_the_default_user_with_its_password_and_sudo(tmp_path: Path) -> None:
    """useradd --prefix writes the files (as root, like the rest of the suite)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        shutil.copy(Path("/etc") / name, etc / name)
    shutil.copytree("/etc/skel", etc / "skel")
    install_vendor_login(tmp_path)
    user = next(line.split(":") for line in (etc / "passwd").read_text().splitlines()
                if line.startswith(f"{VENDOR_USER}:"))
    assert user[5] == f"/home/{VENDOR_USER}" and user[6] == "/bin/bash"
    assert (tmp_path / "home" / VENDOR_USER / ".bashrc").is_file()
    sudo = next(line for line in (etc / "group").read_text().splitlines() if line.startswith("sudo:"))
    assert VENDOR_USER in sudo.rsplit(":", 1)[1].split(",")
    stored = next(line.split(":")[1] for line in (etc / "shadow").read_text().splitlines()
                  if line.startswith(f"{VENDOR_USER}:"))
    salt = stored.split("$")[2]
    again = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, VENDOR_PASSWORD],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert stored == again
    assert (tmp_path / VENDOR_SSHD_DROPIN).read_text() == "PasswordAuthentication yes\nPermitRootLogin no\n"
