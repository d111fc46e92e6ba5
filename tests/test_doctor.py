"""`cmsml doctor` (cmsmlkit/doctor.py): each check against the real environment, and with
tools removed from PATH or a proxy put in place, as a user's machine would have them."""

from __future__ import annotations

import datetime
import os
import socket
import stat
import sys
import time
from importlib import metadata

import pytest
from proxies import proxy_key_pem, write_proxy

import cmsmlkit
from cmsmlkit import doctor
from cmsmlkit.cli import main

PROXY_FIX = "voms-proxy-init -voms cms -rfc -valid 192:00"


@pytest.fixture
def bare_path(tmp_path, monkeypatch):
    """A PATH with nothing on it but an empty directory (no voms-proxy-info, no condor...)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


# --------------------------------------------------------------------------- packages


def test_installed_packages_are_ok():
    checks = {c.name: c for c in doctor.check_packages()}
    assert list(checks) == [name for name, _ in doctor.PACKAGES]
    assert checks["cmsmlkit"].status == "OK"
    assert checks["cmsmlkit"].detail == cmsmlkit.__version__
    assert checks["torch"].detail == metadata.version("torch")
    assert all(c.status == "OK" for c in checks.values())


def test_missing_required_and_optional_packages():
    missing, optional = doctor.check_packages(
        [("cmsml-no-such-package", True), ("cmsml-no-such-extra", False)]
    )
    assert missing.status == "MISSING" and "not installed (required)" in missing.detail
    assert missing.fix == "pip install 'cmsml-no-such-package'"
    assert optional.status == "WARN" and "optional" in optional.detail
    assert doctor.exit_status([missing, optional]) == 1
    assert doctor.exit_status([optional]) == 0


def test_too_old_version_is_missing(monkeypatch):
    # cmsmlkit's real requirements with one made impossible to meet
    wanted = {**doctor._requirements(), "h5py": ">=999"}
    monkeypatch.setattr(doctor, "_requirements", lambda: wanted)
    (check,) = doctor.check_packages([("h5py", True)])
    assert check.status == "MISSING"
    assert check.detail == f"{metadata.version('h5py')} installed, cmsmlkit needs >=999"
    assert check.fix == "pip install 'h5py>=999'"


def test_requirements_come_from_the_package_metadata():
    wanted = doctor._requirements()
    assert wanted["torch"].startswith(">=")
    assert "h5py" in wanted and "pytest" not in wanted  # extras are not requirements


# --------------------------------------------------------------------------- proxy


def test_no_proxy(tmp_path, monkeypatch, bare_path):
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "x509up_missing"))
    check = doctor.check_proxy()
    assert check.status == "WARN"
    assert f"none at {tmp_path / 'x509up_missing'} ($X509_USER_PROXY)" in check.detail
    assert check.fix == PROXY_FIX


@pytest.mark.parametrize(
    ("valid_for", "status", "text"),
    [
        (datetime.timedelta(days=3, hours=5), "OK", "3d 4h left"),
        (datetime.timedelta(hours=2), "WARN", "1h 59m left; a long job would outlive it"),
        (datetime.timedelta(hours=-1), "WARN", "expired"),
    ],
)
def test_proxy_time_left_from_the_certificate(
    tmp_path, monkeypatch, bare_path, valid_for, status, text
):
    # no voms-proxy-info on the bare PATH: the notAfter of the certificate is read
    proxy = tmp_path / "x509up_test"
    key_pem = proxy_key_pem(write_proxy(proxy, valid_for))
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    check = doctor.check_proxy()
    assert (check.status, check.detail) == (status, f"{proxy}: {text}")
    assert check.fix == ("" if status == "OK" else PROXY_FIX)
    table = doctor.format_table([check])
    assert "BEGIN" not in table and key_pem.decode().splitlines()[1] not in table


def test_proxy_time_left_from_voms_proxy_info(tmp_path, monkeypatch, bare_path):
    # voms-proxy-info cannot be installed here (it needs the CMS/WLCG repositories): a
    # stand-in script answers `--timeleft` as the real one does, with seconds left
    proxy = tmp_path / "x509up_test"
    write_proxy(proxy, datetime.timedelta(hours=1))  # the certificate says 1 h ...
    script = bare_path / "voms-proxy-info"
    script.write_text("#!/bin/sh\necho 90000\n")  # ... voms-proxy-info says 25 h
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    check = doctor.check_proxy()
    assert (check.status, check.detail) == ("OK", f"{proxy}: 1d 1h left")


# --------------------------------------------------------------------------- XRootD


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_redirector_is_a_quick_warning():
    port = _closed_port()
    start = time.monotonic()
    check = doctor.check_xrootd(f"root://127.0.0.1:{port}/", timeout=2)
    assert time.monotonic() - start < 15
    assert check.status == "WARN"
    assert check.detail.startswith(f"root://127.0.0.1:{port}: ")
    assert "network" in check.fix


def test_not_a_root_url():
    check = doctor.check_xrootd("https://example.org/")
    assert (check.status, check.detail) == ("WARN", "'https://example.org/' is not a root:// URL")


def test_no_xrootd_client(monkeypatch, bare_path):
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: None)
    check = doctor.check_xrootd("root://127.0.0.1:1094/")
    assert check.status == "WARN" and "neither the XRootD Python client nor xrdfs" in check.detail
    assert check.fix.startswith("pip install xrootd")


# --------------------------------------------------------------------------- programs, GPU


def test_tools_missing_from_path(bare_path):
    checks = {c.name: c for c in doctor.check_cluster()}
    assert checks["condor_submit"].status == "WARN"
    assert "lxplus.cern.ch" in checks["condor_submit"].fix
    assert checks["sbatch"].status == "WARN"
    das = doctor.check_program("dasgoclient", "DAS", "source /cvmfs/cms.cern.ch/cmsset_default.sh")
    assert (das.status, das.detail) == ("WARN", "not on PATH (DAS)")


def test_tool_on_path_is_found(bare_path):
    # dasgoclient is only on CVMFS: an executable of that name on PATH is what is checked
    tool = bare_path / "dasgoclient"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    check = doctor.check_program("dasgoclient", "DAS", "fix")
    assert (check.status, check.detail) == ("OK", str(tool))


def test_real_cluster_tools():
    checks = {c.name: c for c in doctor.check_cluster()}
    assert checks["dask_jobqueue"].status == "OK"
    sbatch = __import__("shutil").which("sbatch")
    assert checks["sbatch"].status == ("OK" if sbatch else "WARN")


def test_gpu_matches_torch():
    import torch

    check = doctor.check_gpu()
    if torch.cuda.is_available():
        assert check.status == "OK" and torch.cuda.get_device_name(0) in check.detail
    else:
        assert check.status == "WARN" and check.detail.startswith("none: training runs on the CPU")


# --------------------------------------------------------------------------- all together


def _row(table: str, name: str) -> list[str]:
    """The cells of the table row of check ``name``: name, status, what was found."""
    line = next(x for x in table.splitlines() if x.startswith(name + "  "))
    return [name, *line[len(name) :].strip().split(None, 1)]


def test_table_and_exit_status():
    checks = [
        doctor.Check("torch", "OK", "2.13.0"),
        doctor.Check("GRID proxy", "WARN", "none", PROXY_FIX),
        doctor.Check("h5py", "MISSING", "not installed (required)", "pip install 'h5py'"),
    ]
    table = doctor.format_table(checks).splitlines()
    assert table[0].split() == ["check", "status", "found"]
    assert table[2].split()[:3] == ["torch", "OK", "2.13.0"]
    assert table[4].strip() == f"fix: {PROXY_FIX}"
    assert table[6].strip() == "fix: pip install 'h5py'"
    assert table[-1] == "1 required item(s) missing: cmsmlkit cannot run until fixed."
    assert doctor.exit_status(checks) == 1


def test_cli_doctor_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "none"))
    assert main(["doctor", "--offline"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "cmsmlkit", "torch", "GRID proxy", "dasgoclient", "GPU", "sbatch"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "XRootD redirector" not in out
    assert f"fix: {PROXY_FIX}" in out
    assert "Everything required is here" in out
    assert _row(out, "python") == ["python", "OK", sys.version.split()[0]]


def test_cli_doctor_pings_the_given_redirector(capsys):
    port = _closed_port()
    assert main(["doctor", "--redirector", f"root://127.0.0.1:{port}/", "--timeout", "2"]) == 0
    row = _row(capsys.readouterr().out, "XRootD redirector")
    assert row[1] == "WARN" and row[2].startswith(f"root://127.0.0.1:{port}: ")


def test_proxy_content_never_printed(tmp_path, monkeypatch, capsys):
    proxy = tmp_path / "x509up_test"
    key_pem = proxy_key_pem(write_proxy(proxy, datetime.timedelta(days=2)))
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    assert main(["doctor", "--offline"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "GRID proxy") == ["GRID proxy", "OK", f"{proxy}: 1d 23h left"]
    assert "PRIVATE KEY" not in out and key_pem.decode().splitlines()[1] not in out


def test_help_explains_doctor(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cmsml doctor" in out and "--offline" in out and "--redirector" in out
    assert "proxy" in out and "dasgoclient" in out
