"""`cmsml submit` / `cmsml jobs`: submit descriptions, the wrapper run for real, real SLURM.

No HTCondor daemons can run here (not in Debian; the PyPI wheel is bindings only),
so HTCondor is tested through the written submit description, every setting
asserted, and through the wrapper, which is plain bash and runs here for real.
SLURM runs for real: a one-node cluster from tests/slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import DEMO_PADDING, DEMO_SKIM
from proxies import write_proxy
from slurm_cluster import slurm_cluster  # noqa: F401 (the fixture)

from cmsmlkit.cli import build_parser, main
from cmsmlkit.errors import ConfigError
from cmsmlkit.submit import (
    Job,
    ProxyError,
    SubmitError,
    format_jobs,
    jobs,
    registry_dir,
    submit,
)

RENEW = "voms-proxy-init -voms cms -rfc -valid 192:00"


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch) -> Path:
    """Every test gets its own job registry (never the user's ~/.cmsmlkit/jobs)."""
    path = tmp_path / "registry"
    monkeypatch.setenv("CMSMLKIT_JOBS", str(path))
    monkeypatch.delenv("X509_USER_PROXY", raising=False)
    return path


def write_pipeline(directory: Path, sections: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def demo_sections(files: dict[str, list[Path]], **extra) -> dict:
    sections = {
        "source": {
            "datasets": {
                name: {"files": [str(p) for p in files[name]], "label": label}
                for name, label in (("ttbar", "signal"), ("wjets", "background"))
            }
        },
        "skim": DEMO_SKIM,
        "convert": {"output": "out/demo.h5", "collections": DEMO_PADDING},
    }
    sections.update(extra)
    return sections


def lines_of(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- HTCondor


def test_htcondor_submit_description_every_setting(tmp_path):
    """The .sub of a skim over root:// inputs, with every resource set (no condor here)."""
    proxy = write_proxy(tmp_path / "x509up_u1000", hours=100)
    pipeline = write_pipeline(
        tmp_path / "ana",
        {
            "source": {
                "datasets": {
                    "ttbar": {"files": ["root://eoscms.cern.ch//store/mc/tt.root"], "label": "s"},
                    "dy": {"files": ["/store/mc/dy.root"], "label": "b"},
                }
            },
            "skim": {"output": "skimmed"},
            "submit": {
                "memory": "4GB",
                "disk": "20GB",
                "extra": ['+AccountingGroup = "group_u_CMS"'],
            },
        },
    )
    job = submit(
        "skim",
        pipeline,
        scheduler="htcondor",
        dry_run=True,
        cpus=4,
        gpus=1,
        job_flavour="longlunch",
        max_runtime="3h",
        max_retries=2,
        proxy=str(proxy),
    )
    assert job.dry_run and job.job_id is None and job.scheduler == "htcondor"
    job_dir = Path(job.job_dir)
    assert job_dir.parent == tmp_path / "ana" / "jobs" and job_dir.name.startswith("cmsml-skim-")
    assert sorted(p.name for p in job_dir.iterdir()) == [
        "config.yaml",
        "job.json",
        "job.sub",
        "run.sh",
    ]
    sub = lines_of(job.submit_file)
    setting = {
        k.strip(): v.strip() for k, _, v in (line.partition("=") for line in sub if "=" in line)
    }
    assert setting == {
        "universe": "vanilla",
        "executable": str(job_dir / "run.sh"),
        "initialdir": str(job_dir),
        "output": "job.out",
        "error": "job.err",
        "log": "job.log",
        "getenv": "false",
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT",
        "x509userproxy": str(proxy),
        "environment": '"X509_USER_PROXY=x509up_u1000"',
        "transfer_input_files": f"{job_dir / 'config.yaml'}, {proxy}",
        "transfer_output_files": '""',
        "request_cpus": "4",
        "request_memory": "4096",  # MB
        "request_disk": str(20 * 1024 * 1024),  # KiB
        "request_gpus": "1",
        "MY.JobFlavour": '"longlunch"',  # the inner quotes are what HTCondor needs
        "MY.MaxRuntime": "10800",
        "max_retries": "2",
        "+AccountingGroup": '"group_u_CMS"',
        "batch_name": job.name,
    }
    assert sub[-1] == "queue 1"
    # the worker config: the stage's output on local scratch, inputs as they were
    worker = yaml.safe_load((job_dir / "config.yaml").read_text())
    assert worker["skim"]["output"] == "out0/skimmed"
    assert "submit" not in worker
    assert worker["source"]["datasets"]["dy"]["files"] == ["/store/mc/dy.root"]
    assert job.outputs == [str(tmp_path / "ana" / "skimmed")]
    # the record: in the job dir and in the registry
    assert json.loads((job_dir / "job.json").read_text())["stage"] == "skim"
    assert json.loads((registry_dir() / f"{job.name}.json").read_text())["job_dir"] == str(job_dir)
    assert "job_id=" not in repr(job) and "dry_run=True" in repr(job)


def test_htcondor_defaults_and_no_proxy_for_local_inputs(tmp_path, demo_files):
    job = submit("convert", write_pipeline(tmp_path, demo_sections(demo_files)), dry_run=True)
    sub = job.submit_file.read_text()
    assert job.scheduler == "htcondor" and job.submit_file.name == "job.sub"
    assert 'MY.JobFlavour           = "workday"' in sub
    assert "request_cpus            = 1" in sub and "max_retries             = 0" in sub
    for absent in ("x509userproxy", "X509_USER_PROXY", "request_memory", "request_gpus", "Runtime"):
        assert absent not in sub
    worker = yaml.safe_load((Path(job.job_dir) / "config.yaml").read_text())
    # local inputs become absolute paths (read in place from the shared filesystem)
    assert worker["source"]["datasets"]["ttbar"]["files"] == [str(demo_files["ttbar"][0])]
    assert worker["convert"]["output"] == "out0/demo.h5"
    assert job.outputs == [str(tmp_path / "out" / "demo.h5")]


def test_proxy_missing_or_expired_is_refused_with_the_renewal_command(tmp_path):
    sections = {
        "source": {"datasets": {"a": {"files": ["root://host//store/a.root"], "label": "s"}}},
        "convert": {"output": "a.h5"},
    }
    pipeline = write_pipeline(tmp_path, sections)
    with pytest.raises(ProxyError) as missing:
        submit("convert", pipeline, dry_run=True, proxy=str(tmp_path / "nope"))
    text = str(missing.value)
    assert text.startswith("the stage reads source.datasets.a.files: root://host//store/a.root")
    assert str(tmp_path / "nope") in text and RENEW in text

    expired = write_proxy(tmp_path / "old_proxy", hours=-5)
    with pytest.raises(ProxyError) as refused:
        submit("convert", pipeline, dry_run=True, proxy=str(expired))
    text = str(refused.value)
    assert "has expired" in text and RENEW in text
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text  # never its content
    # nothing was written for a refused job
    assert not (tmp_path / "jobs").exists()


def test_proxy_found_through_the_environment(tmp_path, monkeypatch):
    proxy = write_proxy(tmp_path / "x509_env", hours=10)
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))
    pipeline = write_pipeline(
        tmp_path,
        {"predict": {"bundle": "root://eosuser.cern.ch//eos/user/a/model", "inputs": ["x.h5"]}},
    )
    (tmp_path / "x.h5").write_bytes(b"")
    job = submit("predict", pipeline, dry_run=True)
    assert f"x509userproxy           = {proxy}" in job.submit_file.read_text()


# --------------------------------------------------------------------------- SLURM script


def test_slurm_script_every_setting(tmp_path, demo_files):
    proxy = write_proxy(tmp_path / "x509up_u0", hours=30)
    sections = demo_sections(demo_files)
    sections["source"]["datasets"]["dy"] = {"files": ["root://xrd//store/dy.root"], "label": "b"}
    pipeline = write_pipeline(tmp_path / "ana", sections)
    job = submit(
        "convert",
        pipeline,
        scheduler="slurm",
        dry_run=True,
        cpus=8,
        memory="16G",
        disk="500MB",
        gpus=2,
        max_runtime="1d",
        partition="gpu",
        account="cms-ml",
        requeue=True,
        proxy=str(proxy),
        job_dir=str(tmp_path / "myjobs"),
    )
    job_dir = Path(job.job_dir)
    assert job_dir.parent == tmp_path / "myjobs" and job.submit_file == job_dir / "job.sbatch"
    script = lines_of(job.submit_file)
    assert script[0] == "#!/bin/bash"
    assert [line for line in script if line.startswith("#SBATCH")] == [
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --chdir={job_dir}",
        f"#SBATCH --output={job_dir / 'job.out'}",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=16384M",
        "#SBATCH --tmp=500M",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=cms-ml",
        "#SBATCH --requeue",
    ]
    # SLURM reads files in place: a private copy of the proxy sits in the job dir
    shipped = job_dir / "x509up"
    assert f"export X509_USER_PROXY={shipped}" in script
    assert stat.S_IMODE(shipped.stat().st_mode) == 0o600
    assert shipped.read_bytes() == proxy.read_bytes()
    assert script[-1] == f"exec bash {job_dir / 'run.sh'}"


def test_slurm_time_forms_and_no_requeue(tmp_path, demo_files):
    pipeline = write_pipeline(tmp_path, demo_sections(demo_files))
    for given, written in (("90m", "01:30:00"), ("1:30:00", "01:30:00"), (45, "00:00:45")):
        job = submit("convert", pipeline, scheduler="slurm", dry_run=True, max_runtime=given)
        assert f"#SBATCH --time={written}" in lines_of(job.submit_file)
        assert "#SBATCH --no-requeue" in lines_of(job.submit_file)


# --------------------------------------------------------------------------- wrapper


def test_wrapper_environment_choices(tmp_path, demo_files):
    pipeline = write_pipeline(tmp_path, demo_sections(demo_files))
    view = "/cvmfs/sft.cern.ch/lcg/views/LCG_105/x86_64-el9-gcc13-opt"

    lcg = submit("convert", pipeline, dry_run=True, lcg_view=view).wrapper.read_text()
    assert f"  source {view}/setup.sh" in lcg and "activate" not in lcg

    venv = submit("convert", pipeline, dry_run=True, venv="/afs/cern.ch/user/a/me/venv")
    assert "  source /afs/cern.ch/user/a/me/venv/bin/activate" in venv.wrapper.read_text()

    image = "/cvmfs/unpacked.cern.ch/registry.hub.docker.com/me/cmsml:1.0"
    boxed = submit("convert", pipeline, dry_run=True, container=image, binds=["/eos"])
    text = boxed.wrapper.read_text()
    assert "APPTAINER=$(command -v apptainer || command -v singularity || true)" in text
    assert f'"$APPTAINER" exec "${{BINDS[@]}}" --pwd "$SCRATCH" {image} bash -c' in text
    binds_line = next(line for line in text.splitlines() if line.startswith("for path in"))
    for bind in ('"$SCRATCH"', '"$JOB_DIR"', "/cvmfs", "/eos", "/" + tmp_path.parts[1]):
        assert bind in binds_line

    default = submit("convert", pipeline, dry_run=True).wrapper.read_text()
    if sys.prefix != sys.base_prefix:  # the submitting virtual environment goes along
        assert f"  source {sys.prefix}/bin/activate" in default
    assert "set -euo pipefail" in default.splitlines()[3]
    assert stat.S_IMODE(Path(boxed.wrapper).stat().st_mode) == 0o755


def test_outputs_to_eos_and_root_urls_go_through_xrdcp(tmp_path, demo_files):
    sections = demo_sections(demo_files)
    sections["convert"]["output"] = "/eos/user/m/me/ana/demo.h5"
    sections["train"] = {"output": "root://eosuser.cern.ch//eos/user/m/me/model"}
    sections["predict"] = {
        "bundle": "/eos/cms/store/group/ml/bundle",
        "inputs": ["/eos/cms/x.root"],
    }
    pipeline = write_pipeline(tmp_path, sections)
    job = submit("convert", pipeline, dry_run=True)
    wrapper = job.wrapper.read_text()
    assert "deliver out0/demo.h5 root://eosuser.cern.ch//eos/user/m/me/ana/demo.h5" in wrapper
    assert 'xrdcp --force --path --nopbar "$src" "$dest"' in wrapper
    assert job.outputs == ["root://eosuser.cern.ch//eos/user/m/me/ana/demo.h5"]
    # a bundle directory is copied recursively into the destination's parent
    job = submit("train", pipeline, dry_run=True, eos_url="root://eosproject.cern.ch/")
    assert (
        "deliver out0/model root://eosuser.cern.ch//eos/user/m/me/model" in job.wrapper.read_text()
    )
    worker = yaml.safe_load((Path(job.job_dir) / "config.yaml").read_text())
    # train reads the convert output in place, through the EOS mount of the worker
    assert worker["train"]["inputs"] == ["/eos/user/m/me/ana/demo.h5"]
    assert worker["train"]["output"] == "out0/model"
    # and eos_url decides where /eos/ outputs go
    job = submit("convert", pipeline, dry_run=True, eos_url="root://eosproject.cern.ch/")
    assert job.outputs == ["root://eosproject.cern.ch//eos/user/m/me/ana/demo.h5"]


def test_run_stage_keeps_intermediate_outputs_on_scratch(tmp_path, demo_files):
    sections = demo_sections(
        demo_files,
        train={"output": "model", "tracking": {"enabled": False}},
        predict={"bundle": "model", "inputs": [str(demo_files["new"][0])], "output": "preds"},
    )
    job = submit("run", write_pipeline(tmp_path, sections), dry_run=True)
    worker = yaml.safe_load((Path(job.job_dir) / "config.yaml").read_text())
    assert worker["convert"]["output"] == "out0/demo.h5"
    assert worker["train"]["inputs"] == ["out0/demo.h5"]  # written earlier in the same job
    assert worker["predict"]["bundle"] == "out1/model"
    assert worker["predict"]["output"] == "out2/preds"
    assert job.outputs == [
        str(tmp_path / "out" / "demo.h5"),
        str(tmp_path / "model" / "bundle.json"),
        str(tmp_path / "preds"),
    ]
    assert "mkdir -p out0 out1 out2" in job.wrapper.read_text()


def run_wrapper(job: Job, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the job's wrapper as a worker would: from a fresh start dir, own TMPDIR."""
    start = tmp_path / "worker"
    scratch = tmp_path / "scratch"
    start.mkdir()
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("_CONDOR")}
    env["TMPDIR"] = str(scratch)
    done = subprocess.run(
        ["bash", str(job.wrapper)], cwd=start, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.stderr == ""  # `exec 2>&1`: everything in one log
    assert list(scratch.iterdir()) == []  # the worker's scratch is cleaned up
    return done


@pytest.mark.slow
def test_wrapper_runs_the_stage_and_delivers_its_output(tmp_path, demo_files):
    pipeline = write_pipeline(tmp_path / "ana", demo_sections(demo_files))
    job = submit("convert", pipeline, scheduler="slurm", dry_run=True)
    done = run_wrapper(job, tmp_path)
    assert done.returncode == 0, done.stdout
    dest = tmp_path / "ana" / "out" / "demo.h5"
    assert f"cmsml-job: out0/demo.h5 -> {dest}" in done.stdout
    assert done.stdout.splitlines()[-1] == "cmsml-job: done"
    import h5py

    with h5py.File(dest) as f:
        assert f["objects/GoodJet/pt"].shape[1] == 5 and len(f["label"]) > 100
    assert not list(dest.parent.glob("*.part-*"))
    assert job.exit_code() == 0
    assert job.found_outputs() == {str(dest): [str(dest)]}
    # the job recorded the stage as done: the same pipeline run here skips it
    from cmsmlkit import Pipeline

    again = Pipeline(pipeline).run(["convert"])
    assert again.skipped == ["convert"] and again.outputs["convert"] == [dest]


def test_wrapper_exit_code_is_the_stages_with_the_error_last(tmp_path, demo_files):
    broken = demo_sections(demo_files)
    broken["skim"] = {
        **DEMO_SKIM,
        "selection": {**DEMO_SKIM["selection"], "cuts": ["num(GodJet) >= 2"]},
    }
    job = submit("convert", write_pipeline(tmp_path / "ana", broken), dry_run=True)
    done = run_wrapper(job, tmp_path)
    assert done.returncode == 2  # cmsml's exit code for a configuration error
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("cmsml-job: FAILED: `cmsml convert` exited with code 2: cmsml: error:")
    assert "GodJet" in last
    assert not (tmp_path / "ana" / "out").exists()  # nothing delivered from a failed stage
    assert job.exit_code() == 2


@pytest.fixture(scope="module")
def xrootd_server():
    """A real XRootD server on loopback of its own network namespace (RECIPES.md)."""
    from servers import require_binaries

    require_binaries("xrootd", "xrdcp", "xrdfs", "nsenter", "ip", apt="xrootd-server xrootd-client")
    if os.geteuid() != 0:
        pytest.skip("the XRootD test server needs root (a network namespace, the xrootd user)")
    # not under pytest's tmp dir: that is private to root, and xrootd runs as its own user
    base = Path(tempfile.mkdtemp(prefix="cmsml-submit-xrd-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    shutil.chown(data, user="xrootd")
    netns = base.name
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}"]
    (base / "xrootd.cfg").write_text(f"all.export {data}\nxrd.port 1094\n")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    server = None
    try:
        subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], check=True)
        log = base / "xrootd.log"
        # xrootd refuses to run as root: run it as the user the package creates
        server = subprocess.Popen(
            [*prefix, "runuser", "-u", "xrootd", "--", "xrootd", "-c", str(base / "xrootd.cfg")],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        url = "root://127.0.0.1:1094/"
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"xrootd exited at once:\n{log.read_text()}")
            ping = subprocess.run(
                [*prefix, "xrdfs", url, "stat", str(data)],
                capture_output=True,
                timeout=30,
                env={**os.environ, "XRD_CONNECTIONRETRY": "1", "XRD_REQUESTTIMEOUT": "5"},
            )
            if ping.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the XRootD test server did not answer:\n{log.read_text()}")
            time.sleep(0.2)
        yield SimpleNamespace(url=url, data=data, prefix=prefix)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        left = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        for pid in left.stdout.split():  # what is left in the namespace is ours
            os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.xrootd
@pytest.mark.slow
def test_outputs_reach_a_root_url_through_xrdcp(xrootd_server, tmp_path, demo_files):
    """A file and a directory copied to a real XRootD server by the wrapper."""
    remote = f"{xrootd_server.url}/{xrootd_server.data}/ana"
    sections = demo_sections(demo_files)
    sections["skim"] = {**DEMO_SKIM, "output": f"{remote}/skimmed"}
    sections["convert"]["output"] = f"{remote}/demo.h5"
    job = submit("run", write_pipeline(tmp_path / "ana", sections), dry_run=True)
    assert job.outputs == [f"{remote}/skimmed", f"{remote}/demo.h5"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [*xrootd_server.prefix, "bash", str(job.wrapper)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
    assert f"cmsml-job: out1/demo.h5 -> {remote}/demo.h5" in done.stdout
    import h5py

    with h5py.File(xrootd_server.data / "ana" / "demo.h5") as f:
        assert f["objects/GoodJet/pt"].shape[1] == 5
    skimmed = sorted(p.name for p in (xrootd_server.data / "ana" / "skimmed").iterdir())
    assert skimmed == ["cutflow.json", "skim.json", "ttbar.root", "wjets.root"]
    # `cmsml jobs` finds them on the server (xrdfs stat, from inside the namespace)
    found = subprocess.run(
        [
            *xrootd_server.prefix,
            sys.executable,
            "-c",
            "import json, sys; from cmsmlkit.submit import Job; "
            "print(json.dumps(Job.load(sys.argv[1]).found_outputs()))",
            job.job_dir,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(found.stdout) == {
        f"{remote}/skimmed": [f"{remote}/skimmed"],
        f"{remote}/demo.h5": [f"{remote}/demo.h5"],
    }


def test_htcondor_transfers_local_inputs_when_asked(tmp_path, demo_files):
    pipeline = write_pipeline(tmp_path / "ana", demo_sections(demo_files))
    job = submit("convert", pipeline, dry_run=True, transfer_inputs=True)
    files = [str(demo_files["ttbar"][0]), str(demo_files["wjets"][0])]
    sub = lines_of(job.submit_file)
    config = str(Path(job.job_dir) / "config.yaml")
    assert f"transfer_input_files    = {', '.join([config, *files])}" in sub
    worker = yaml.safe_load(Path(config).read_text())
    assert worker["source"]["datasets"]["ttbar"]["files"] == ["in/ttbar.root"]
    wrapper = job.wrapper.read_text()
    assert 'mv -f "$START_DIR"/ttbar.root in/' in wrapper
    # two inputs of one name would overwrite each other on the worker
    twin = tmp_path / "other" / "ttbar.root"
    twin.parent.mkdir()
    twin.write_bytes(demo_files["ttbar"][0].read_bytes())
    sections = demo_sections(demo_files)
    sections["source"]["datasets"]["wjets"]["files"] = [str(twin)]
    with pytest.raises(ConfigError, match="two inputs are named 'ttbar.root'"):
        submit("convert", write_pipeline(tmp_path / "b", sections), transfer_inputs=True)
    with pytest.raises(ConfigError, match="transfer_inputs is for HTCondor"):
        submit("convert", pipeline, scheduler="slurm", dry_run=True, transfer_inputs=True)


@pytest.mark.slow
def test_wrapper_as_htcondor_runs_it(tmp_path, demo_files):
    """The start dir HTCondor makes: the transferred config and inputs, $_CONDOR_SCRATCH_DIR."""
    pipeline = write_pipeline(tmp_path / "ana", demo_sections(demo_files))
    job = submit("convert", pipeline, dry_run=True, transfer_inputs=True)
    start = tmp_path / "condor_scratch"
    start.mkdir()
    shutil.copy(Path(job.job_dir) / "config.yaml", start)
    for name in ("ttbar", "wjets"):
        shutil.copy(demo_files[name][0], start)
    env = {**os.environ, "_CONDOR_SCRATCH_DIR": str(start)}
    done = subprocess.run(
        ["bash", str(job.wrapper)], cwd=start, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout
    dest = tmp_path / "ana" / "out" / "demo.h5"
    assert f"cmsml-job: out0/demo.h5 -> {dest}" in done.stdout
    import h5py

    with h5py.File(dest) as f:
        assert len(f["label"]) > 100
    # the job's own scratch is gone; HTCondor cleans its start dir itself
    assert sorted(p.name for p in start.iterdir()) == ["config.yaml"]


def test_submit_section_round_trips_through_yaml(tmp_path):
    from cmsmlkit.config import SubmitConfig, load_config

    text = (
        "submit:\n  scheduler: slurm\n  gpus: 1\n  memory: 8GB\n  max_runtime: 12h\n"
        "  partition: gpu\n  requeue: true\n  binds: [/eos, /afs]\n"
    )
    path = tmp_path / "p.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.submit == SubmitConfig(
        scheduler="slurm",
        gpus=1,
        memory="8GB",
        max_runtime="12h",
        partition="gpu",
        requeue=True,
        binds=["/eos", "/afs"],
    )
    assert yaml.safe_load(cfg.to_yaml()) == yaml.safe_load(text)
    assert cfg.submit.job_flavour == "workday" and cfg.submit.cpus == 1


# --------------------------------------------------------------------------- errors


def test_bad_settings_are_named(tmp_path, demo_files):
    pipeline = write_pipeline(tmp_path, demo_sections(demo_files))
    with pytest.raises(ConfigError, match=r"cannot submit stage 'trian'.*Did you mean 'train'"):
        submit("trian", pipeline, dry_run=True)
    with pytest.raises(ConfigError, match=r"unknown job setting 'gpu'\. Did you mean 'gpus'"):
        submit("convert", pipeline, dry_run=True, gpu=1)
    with pytest.raises(ConfigError, match=r"submit\.memory: cannot read '4 parsecs' as a size"):
        submit("convert", pipeline, dry_run=True, memory="4 parsecs")
    with pytest.raises(ConfigError, match=r"submit\.max_runtime: cannot read 'soon'"):
        submit("convert", pipeline, dry_run=True, max_runtime="soon")
    with pytest.raises(ConfigError, match="'job_flavour' must be one of"):
        submit("convert", pipeline, dry_run=True, job_flavour="lunch")
    with pytest.raises(ConfigError, match=r"stage 'train' needs the section\(s\) 'train:'"):
        submit("train", pipeline, dry_run=True)
    bad_yaml = write_pipeline(tmp_path / "b", {"submit": {"cpu": 2}})
    with pytest.raises(ConfigError, match=r"unknown key 'submit\.cpu'\. Did you mean 'cpus'"):
        submit("run", bad_yaml, dry_run=True)


def test_missing_inputs_are_listed_before_anything_is_written(tmp_path):
    pipeline = write_pipeline(tmp_path, {"train": {"inputs": ["data/*.h5", "gone.h5"]}})
    with pytest.raises(ConfigError) as error:
        submit("train", pipeline, dry_run=True)
    text = str(error.value)
    assert f"train.inputs: {tmp_path / 'data' / '*.h5'}" in text
    assert f"train.inputs: {tmp_path / 'gone.h5'}" in text
    assert not (tmp_path / "jobs").exists()


def test_submit_without_the_scheduler_says_how(tmp_path, demo_files, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no condor_submit (and none exists here anyway)
    pipeline = write_pipeline(tmp_path, demo_sections(demo_files))
    with pytest.raises(SubmitError) as error:
        submit("convert", pipeline, scheduler="htcondor")
    text = str(error.value)
    assert "`condor_submit` is not on PATH" in text and "--dry-run" in text
    job_dir = next((tmp_path / "jobs").iterdir())
    assert f"cd {job_dir} && condor_submit job.sub" in text
    assert (job_dir / "job.sub").is_file()


# --------------------------------------------------------------------------- listing


# HTCondor's job event log as the schedd writes it (format of HTCondor 23); no condor here.
CONDOR_LOG = """\
000 (4567.000.000) 2025-03-01 10:00:00 Job submitted from host: <188.184.0.1:9618>
...
001 (4567.000.000) 2025-03-01 10:02:00 Job executing on host: <10.0.0.5:9618>
...
005 (4567.000.000) 2025-03-01 11:00:00 Job terminated.
\t(1) Normal termination (return value {code})
...
"""


def test_jobs_lists_states_and_outputs(tmp_path, demo_files, monkeypatch, capsys):
    stand_in = str(demo_files["ttbar"][0])  # train's input must exist; it is not read here
    pipeline = write_pipeline(
        tmp_path, demo_sections(demo_files, train={"output": "model", "inputs": [stand_in]})
    )
    dry = submit("convert", pipeline, dry_run=True)
    time.sleep(1.1)  # the listing is newest first, by submission second
    done = submit("train", pipeline, dry_run=True, job_dir="jobs2")
    failed = submit("convert", pipeline, dry_run=True, job_dir="jobs3")
    # pretend these two went to a schedd: their event logs say how they ended
    for job, code in ((done, 0), (failed, 1)):
        job.job_id, job.dry_run = "4567", False
        job.save()
        (Path(job.job_dir) / "job.log").write_text(CONDOR_LOG.format(code=code))
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")

    listed = jobs()
    assert [j.name for j in listed][-1] == dry.name
    states = {j.name: j.state() for j in listed}
    assert states == {dry.name: "not submitted", done.name: "completed", failed.name: "failed"}
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "JOB",
        "ID",
        "SCHEDULER",
        "STAGE",
        "STATE",
        "SUBMITTED",
        "JOB",
        "DIR",
    ]
    assert f"    output: {bundle / 'bundle.json'}" in out
    assert f"    output: {tmp_path / 'out' / 'demo.h5'} (missing)" in out
    assert f"    log:    {failed.job_dir}/job.out" in out
    # a job directory deleted by the user takes the job off the list
    shutil.rmtree(failed.job_dir)
    assert failed.name not in format_jobs(jobs())
    assert len(jobs(limit=1)) == 1


def test_cli_submit_dry_run_and_help(tmp_path, demo_files, capsys):
    pipeline = write_pipeline(tmp_path, demo_sections(demo_files))
    code = main(
        [
            "submit",
            "convert",
            str(pipeline),
            "--scheduler",
            "slurm",
            "--dry-run",
            "--cpus",
            "2",
            "--memory",
            "3GB",
            "--no-requeue",
            "--partition",
            "short",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    job_dir = next((tmp_path / "jobs").iterdir())
    assert f"wrote {job_dir.name} (not submitted): {job_dir / 'job.sbatch'}" in out
    assert f"submit it with: cd {job_dir} && sbatch job.sbatch" in out
    assert f"log:           {job_dir / 'job.out'}" in out
    script = (job_dir / "job.sbatch").read_text()
    assert (
        "--cpus-per-task=2" in script and "--mem=3072M" in script and "--partition=short" in script
    )
    # errors exit 2 with the message
    assert main(["submit", "convert", str(pipeline), "--dry-run", "--max-runtime", "later"]) == 2
    assert "cannot read 'later' as a duration" in capsys.readouterr().err
    for command in ("submit", "jobs"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        description = build_parser()._subparsers._group_actions[0].choices[command].description
        assert f"usage: cmsml {command}" in out
        assert description.split()[0] in out and len(description) > 60


# --------------------------------------------------------------------------- real SLURM


def cmsml_in(cluster, args: list[str], registry: Path, cwd: Path) -> str:
    cmsml = str(Path(sys.executable).parent / "cmsml")
    done = cluster.run(["env", f"CMSMLKIT_JOBS={registry}", cmsml, *args], cwd=cwd, timeout=120)
    return done.stdout


def wait_for(cluster, job_id: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = cluster.run(["scontrol", "show", "job", job_id], check=False).stdout
        state = shown.split("JobState=")[1].split()[0] if "JobState=" in shown else "?"
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            return state
        time.sleep(1)
    raise AssertionError(f"SLURM job {job_id} still not finished after {timeout} s: {shown}")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_training_job_leaves_its_bundle(slurm_cluster, demo_chain, tmp_path, registry):  # noqa: F811
    pipeline = write_pipeline(
        tmp_path / "ana",
        {
            "train": {
                "inputs": [str(demo_chain.h5)],
                "output": "model",
                "max_epochs": 2,
                "batch_size": 256,
                "tracking": {"enabled": False},
            },
        },
    )
    args = ["submit", "train", str(pipeline), "--scheduler", "slurm"]
    out = cmsml_in(
        slurm_cluster, [*args, "--partition", slurm_cluster.partition], registry, tmp_path
    )
    assert out.startswith("submitted train as slurm job ")
    job_id = out.split("slurm job ")[1].split()[0]
    assert wait_for(slurm_cluster, job_id) == "COMPLETED", Path(next(iter(jobs())).log).read_text()
    bundle = tmp_path / "ana" / "model"
    assert json.loads((bundle / "bundle.json").read_text())["class_names"] == [
        "signal",
        "background",
    ]
    assert (bundle / "model.pt").is_file() and (bundle / "model.onnx").is_file()
    (job,) = jobs()
    assert job.job_id == job_id and job.exit_code() == 0
    log = job.log.read_text().strip().splitlines()
    assert log[-1] == "cmsml-job: done"
    assert f"cmsml-job: out0/model -> {bundle}" in log
    listing = cmsml_in(slurm_cluster, ["jobs"], registry, tmp_path)
    assert f"{job_id:<10} slurm     train    completed" in listing
    assert f"    output: {bundle / 'bundle.json'}" in listing


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_with_a_broken_config_fails(slurm_cluster, tmp_path, registry):  # noqa: F811
    # valid YAML and real inputs, but not HDF5: the training stage itself fails on the node
    fake = tmp_path / "data.h5"
    fake.write_text("not an HDF5 file")
    pipeline = write_pipeline(
        tmp_path / "ana", {"train": {"inputs": [str(fake)], "tracking": {"enabled": False}}}
    )
    out = cmsml_in(
        slurm_cluster,
        ["submit", "train", str(pipeline), "--scheduler", "slurm"],
        registry,
        tmp_path,
    )
    job_id = out.split("slurm job ")[1].split()[0]
    assert wait_for(slurm_cluster, job_id, timeout=120) == "FAILED"
    (job,) = jobs()
    last = job.log.read_text().strip().splitlines()[-1]
    assert last.startswith("cmsml-job: FAILED: `cmsml train` exited with code 2: cmsml: error:")
    assert str(fake) in last
    assert job.exit_code() == 2
    listing = cmsml_in(slurm_cluster, ["jobs"], registry, tmp_path)
    assert f"{job_id:<10} slurm     train    failed" in listing
    assert f"    log:    {job.log}" in listing
