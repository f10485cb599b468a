"""The rknpu textfile collector script, rendered by Ansible and run against fixture debugfs files."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from monitoring_harness import render_monitoring
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def rendered_collector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp_path = tmp_path_factory.mktemp("collector")
    debugfs, textfile = tmp_path / "debugfs", tmp_path / "textfile"
    run = render_monitoring(tmp_path / "render", {
        "monitoring_rknpu_load_path": str(debugfs / "load"),
        "monitoring_rknpu_freq_path": str(debugfs / "freq"),
        "monitoring_rknpu_version_path": str(debugfs / "version"),
        "monitoring_node_exporter_textfile_dir": str(textfile),
    })
    assert run.returncode == 0, run.stdout + run.stderr
    return tmp_path / "render/rknpu-textfile-collector", debugfs, textfile


@pytest.fixture
def collector(rendered_collector: tuple[Path, Path, Path]) -> Iterator[tuple[Path, Path, Path]]:
    """(script, empty fake debugfs dir, empty textfile dir), the script rendered once per module."""
    _, debugfs, textfile = rendered_collector
    debugfs.mkdir()
    textfile.mkdir()
    yield rendered_collector
    shutil.rmtree(debugfs)
    shutil.rmtree(textfile)


def scrape(script: Path, textfile: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    subprocess.run([str(script)], check=True, timeout=30)
    assert [p.name for p in textfile.iterdir()] == ["rknpu.prom"]  # the temp file was renamed away
    assert (textfile / "rknpu.prom").stat().st_mode & 0o777 == 0o644
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families((textfile / "rknpu.prom").read_text())
        for sample in family.samples
    }


def test_collector_publishes_load_frequency_and_driver(collector: tuple[Path, Path, Path]) -> None:
    script, debugfs, textfile = collector
    (debugfs / "load").write_text("NPU load:  Core0: 12%, Core1:  0%, Core2: 47%,\n")
    (debugfs / "freq").write_text("1000000000\n")
    (debugfs / "version").write_text("RKNPU driver: v0.9.6\n")
    metrics = scrape(script, textfile)
    assert metrics[("rknpu_load_percent", (("core", "0"),))] == 12
    assert metrics[("rknpu_load_percent", (("core", "1"),))] == 0
    assert metrics[("rknpu_load_percent", (("core", "2"),))] == 47
    assert metrics[("rknpu_frequency_hz", ())] == 1e9
    assert metrics[("rknpu_driver_info", (("version", "0.9.6"),))] == 1
    assert metrics[("rknpu_driver_version_code", ())] == 906
    for name in ("load", "freq", "version"):
        assert metrics[("rknpu_collector_file_readable", (("file", name),))] == 1


def test_collector_reports_unreadable_files_not_stale_values(collector: tuple[Path, Path, Path]) -> None:
    script, debugfs, textfile = collector
    (debugfs / "load").write_text("NPU load:  Core0: 90%, Core1: 90%, Core2: 90%,\n")
    (debugfs / "version").write_text("RKNPU driver: v0.9.8\n")
    assert scrape(script, textfile)[("rknpu_load_percent", (("core", "2"),))] == 90
    (debugfs / "load").unlink()
    metrics = scrape(script, textfile)
    assert metrics[("rknpu_collector_file_readable", (("file", "load"),))] == 0
    assert metrics[("rknpu_collector_file_readable", (("file", "freq"),))] == 0
    assert not any(name == "rknpu_load_percent" for name, _ in metrics)
    assert metrics[("rknpu_driver_version_code", ())] == 908
