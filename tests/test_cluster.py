"""cmsmlkit/cluster.py: local, address, SLURM (for real) and HTCondor (rendered) clusters."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import sys
import threading
import time
from pathlib import Path

import awkward as ak
import pytest
import yaml
from conftest import DEMO_SKIM
from proxies import write_proxy
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from cmsmlkit.cluster import PROXY_FIX, WORKER_MALLOC, dask_client, grid_proxy, jobqueue_cluster
from cmsmlkit.config import ClusterConfig, build_config, load_config
from cmsmlkit.errors import ConfigError

VIEW = "LCG_105/x86_64-el9-gcc13-opt"


@pytest.fixture
def proxy(tmp_path, monkeypatch) -> Path:
    """A valid proxy in $X509_USER_PROXY; voms-proxy-info is not installed here (cryptography)."""
    path = write_proxy(tmp_path / "x509up_u4242", hours=100)
    monkeypatch.setenv("X509_USER_PROXY", str(path))
    return path


def header(script: str) -> dict[str, str]:
    """The 'key = value' lines of an HTCondor submit description."""
    return dict(
        line.split(" = ", 1) for line in script.splitlines() if " = " in line and "#" not in line
    )


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cores": 3, "threads_per_worker": 2}, "cores: 3 is not a multiple of threads_per_worker"),
        ({"adapt_min": 1}, "adapt_min needs adapt_max"),
        ({"adapt_min": 5, "adapt_max": 2}, "adapt_min: 5 is larger than adapt_max: 2"),
        ({"lcg_view": VIEW, "container": "/img.sif"}, "set lcg_view or container, not both"),
        ({"ports": "10000"}, "ports must read 'LOW-HIGH'"),
        ({"ports": "10100-10000"}, "ports must read 'LOW-HIGH'"),
        ({"type": "address"}, "type: address needs address"),
        ({"address": "tcp://h:8786"}, "address is set but type is 'local'; set type: address"),
        ({"job_flavour": "lunch"}, "'job_flavour' must be one of 'espresso'"),
        ({"partiton": "short"}, "unknown key 'partiton'. Did you mean 'partition'?"),
    ],
)
def test_impossible_combinations_are_refused(fields, message):
    with pytest.raises(ConfigError) as info:
        build_config(ClusterConfig, fields, {})
    assert message in str(info.value)


def test_a_cluster_block_round_trips_through_yaml(tmp_path):
    text = (
        "cluster:\n  type: slurm\n  workers: 4\n  partition: short\n  memory: 4GB\n"
        "  walltime: '02:00:00'\n  extra_directives: [--gres=gpu:1]\n"
    )
    (tmp_path / "p.yaml").write_text(text)
    cluster = load_config(tmp_path / "p.yaml").cluster
    assert (cluster.partition, cluster.workers, cluster.extra_directives) == (
        "short",
        4,
        ["--gres=gpu:1"],
    )
    assert yaml.safe_load(cluster.to_yaml()) == yaml.safe_load(text)["cluster"]
    assert ClusterConfig().job_flavour == "longlunch" and ClusterConfig().ports == "10000-10100"


# --------------------------------------------------------------------------- local


def test_one_local_worker_runs_in_process():
    with dask_client(ClusterConfig()) as client:
        assert client is None
    with dask_client({"workers": 1}) as client:
        assert client is None


def test_local_workers_are_processes_closed_on_exit():
    with dask_client(ClusterConfig(workers=2, threads_per_worker=1)) as client:
        info = client.scheduler_info()["workers"]
        assert len(info) == 2
        assert all(w["nthreads"] == 1 for w in info.values())
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
        assert client.submit(sum, [1, 2, 3]).result() == 6
        # not distributed's MALLOC_TRIM_THRESHOLD_=65536, which made skims 1.7x slower
        env = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC})
        assert list(env.values()) == [WORKER_MALLOC] * 2
        assert WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"] == "67108864"
    assert client.status == "closed"


def test_local_adaptive_scales_up_from_zero():
    with dask_client(ClusterConfig(adapt_min=0, adapt_max=2)) as client:
        assert client.submit(pow, 2, 10).result(timeout=60) == 1024
        assert 1 <= len(client.scheduler_info()["workers"]) <= 2


def test_address_connects_and_leaves_the_scheduler_running():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with dask_client(ClusterConfig(type="address", address=cluster.scheduler_address)) as c:
            assert c.submit(len, "abcd").result() == 4
        with Client(cluster) as again:  # still there for the next stage
            assert again.submit(len, "ab").result() == 2


def test_local_and_address_run_no_batch_jobs():
    with pytest.raises(ConfigError, match="only slurm and htcondor run batch jobs"):
        jobqueue_cluster(ClusterConfig(workers=3))


# --------------------------------------------------------------------------- GRID proxy


def test_grid_proxy_from_the_environment(proxy):
    assert grid_proxy() == proxy
    assert grid_proxy(str(proxy)) == proxy


def test_grid_proxy_defaults_to_tmp_x509up(monkeypatch, tmp_path):
    monkeypatch.delenv("X509_USER_PROXY", raising=False)
    monkeypatch.setattr("cmsmlkit.cluster._default_proxy", lambda: str(tmp_path / "x509up_u7"))
    with pytest.raises(ConfigError) as info:
        grid_proxy()
    text = str(info.value)
    assert f"no GRID proxy at {tmp_path / 'x509up_u7'} (the default)" in text
    assert "`voms-proxy-init -voms cms -rfc -valid 192:00`" in text
    write_proxy(tmp_path / "x509up_u7", hours=1)
    assert grid_proxy() == tmp_path / "x509up_u7"


def test_missing_and_expired_proxies_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"no GRID proxy at .*nothing \(\$X509_USER_PROXY\)"):
        grid_proxy()
    old = write_proxy(tmp_path / "old", hours=-3)
    with pytest.raises(ConfigError) as info:
        grid_proxy(old)
    assert f"the GRID proxy {old} has expired (3.0 h ago)" in str(info.value)
    assert PROXY_FIX == "voms-proxy-init -voms cms -rfc -valid 192:00"
    assert f"`{PROXY_FIX}`" in str(info.value)
    # no job is described, let alone submitted, with a dead proxy
    with pytest.raises(ConfigError, match="has expired"):
        jobqueue_cluster(ClusterConfig(type="htcondor", proxy=str(old)))


# --------------------------------------------------------------------------- HTCondor
# No HTCondor daemons can run here (not packaged for Debian 12, and the PyPI wheel
# is bindings only): these tests check the submit description dask-jobqueue renders
# (``job_script()``), which is exactly what ``condor_submit`` would receive.


def test_htcondor_submit_description_has_the_lxplus_settings(proxy):
    config = ClusterConfig(type="htcondor", workers=3, lcg_view=VIEW, cores=2)
    with jobqueue_cluster(config) as cluster:
        script = cluster.job_script()
        port = int(cluster.scheduler_address.rsplit(":", 1)[1])
    lines = header(script)
    assert lines["MY.JobFlavour"] == '"longlunch"'  # the inner quotes: a ClassAd string
    assert lines["x509userproxy"] == str(proxy.resolve())
    assert lines["MY.DaskWorkerCores"] == "2"
    assert lines["MY.DaskWorkerMemory"] == str(4 * 10**9)
    assert lines["MY.DaskWorkerDisk"] == str(4 * 10**9)
    assert "MY.SingularityImage" not in lines and "MY.MaxRuntime" not in lines
    assert 10000 <= port <= 10100
    arguments = lines["Arguments"]
    assert arguments.startswith(
        "\"-c 'export MALLOC_TRIM_THRESHOLD_=67108864 MALLOC_MMAP_THRESHOLD_=33554432; "
        "source /cvmfs/sft.cern.ch/lcg/views/LCG_105/x86_64-el9-gcc13-opt/setup.sh; "
        "export X509_USER_PROXY=$_CONDOR_SCRATCH_DIR/x509up_u4242; python3 -m "
        "distributed.cli.dask_worker tcp://"
    )
    assert f":{port} " in arguments
    assert "--worker-port=10000:10100 --nanny-port=10000:10100" in arguments
    assert "--nthreads 1 " in arguments and "--nworkers 2 " in arguments


def test_htcondor_in_a_container_with_more_time_and_extra_lines(proxy, tmp_path):
    image = "/cvmfs/unpacked.cern.ch/registry.hub.docker.com/coffeateam/coffea-dask:latest"
    config = ClusterConfig(
        type="htcondor",
        container=image,
        job_flavour="workday",
        walltime="1-02:00:00",
        account="group_u_CMS.u_zh.users",
        ports="10050:10060",
        memory="3GB",
        extra_directives=['requirements = (OpSysAndVer =?= "AlmaLinux9")'],
        log_directory=str(tmp_path / "logs"),
    )
    with jobqueue_cluster(config) as cluster:
        script = cluster.job_script()
        port = int(cluster.scheduler_address.rsplit(":", 1)[1])
    lines = header(script)
    assert lines["MY.SingularityImage"] == f'"{image}"'
    assert lines["MY.JobFlavour"] == '"workday"'
    assert lines["MY.MaxRuntime"] == str(26 * 3600)
    assert lines["accounting_group"] == "group_u_CMS.u_zh.users"
    assert lines["requirements"] == '(OpSysAndVer =?= "AlmaLinux9")'
    assert lines["MY.DaskWorkerMemory"] == str(3 * 10**9)
    assert lines["LogDirectory"] == str(tmp_path / "logs")
    assert 10050 <= port <= 10060
    assert "--worker-port=10050:10060" in lines["Arguments"]
    assert "; export X509_USER_PROXY=$_CONDOR_SCRATCH_DIR/x509up_u4242; python3 -m" in script
    assert "source /cvmfs" not in script


def test_htcondor_without_proxy_ships_none(monkeypatch, tmp_path):
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "absent"))
    with jobqueue_cluster(ClusterConfig(type="htcondor", ship_proxy=False)) as cluster:
        script = cluster.job_script()
    assert "x509userproxy" not in script and "X509_USER_PROXY" not in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script  # shared filesystem


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"extra_directives": ["requirements"]}, "'requirements' is not an HTCondor submit line"),
        ({"walltime": "2h"}, "cluster.walltime '2h' must read 'HH:MM:SS'"),
        ({"lcg_view": "LCG_105"}, "must read 'LCG_<version>/<platform>'"),
    ],
)
def test_htcondor_settings_it_cannot_use(proxy, fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        jobqueue_cluster(ClusterConfig(type="htcondor", **fields))


# --------------------------------------------------------------------------- SLURM


def test_slurm_batch_script_carries_every_setting(tmp_path):
    config = ClusterConfig(
        type="slurm",
        partition="short",
        account="cms",
        cores=4,
        threads_per_worker=2,
        memory="8GB",
        walltime="02:30:00",
        extra_directives={"gres": "gpu:1"},
        lcg_view="/cvmfs/sft.cern.ch/lcg/views/LCG_105/x86_64-el9-gcc13-opt/",
        local_directory=str(tmp_path),
        interface="lo",
    )
    with jobqueue_cluster(config) as cluster:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH -J dask-worker",
        "#SBATCH -p short",
        "#SBATCH -A cms",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=8G",
        "#SBATCH -t 02:30:00",
        "#SBATCH --gres=gpu:1",
    ]
    assert (
        "\nexport MALLOC_TRIM_THRESHOLD_=67108864 MALLOC_MMAP_THRESHOLD_=33554432\n"
        "source /cvmfs/sft.cern.ch/lcg/views/LCG_105/x86_64-el9-gcc13-opt/setup.sh\n"
    ) in script
    assert "python3 -m distributed.cli.dask_worker tcp://127.0.0.1:" in script
    assert "--nthreads 2 --memory-limit 3.73GiB --nworkers 2" in script
    assert f"--local-directory {tmp_path}" in script
    assert "x509" not in script.lower()


def test_slurm_defaults_and_containers():
    with jobqueue_cluster(ClusterConfig(type="slurm")) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -t 01:00:00" in script and "#SBATCH --mem=2G" in script
    assert "#SBATCH -p" not in script  # the cluster's default partition
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    with pytest.raises(ConfigError, match="'apptainer exec /img.sif python3'"):
        jobqueue_cluster(ClusterConfig(type="slurm", container="/img.sif"))
    shell = ClusterConfig(type="slurm", python="apptainer exec /img.sif python3")
    with jobqueue_cluster(shell) as cluster:
        assert "\napptainer exec /img.sif python3 -m distributed.cli.dask_worker" in (
            cluster.job_script()
        )


SLURM_SKIM = """
import json, pickle, sys
from cmsmlkit import Skimmer
from cmsmlkit.config import ClusterConfig

skim, path, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
cluster = ClusterConfig(
    type="slurm", partition=sys.argv[4], workers=2, memory="1GB", interface="lo",
    walltime="00:10:00", log_directory="logs",
)
result = Skimmer(skim, cluster=cluster).run({"ttbar": {"files": {path: "Events"}}})
with open(out, "wb") as f:
    pickle.dump({"arrays": result.arrays, "cutflow": result.cutflow}, f)
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_skim_on_slurm_workers_equals_the_local_skim(slurm_cluster, tmp_path):  # noqa: F811
    from cmsmlkit import Skimmer
    from cmsmlkit.data import toy

    path = toy.write_nanoaod(tmp_path / "ttbar.root", "ttbar", 3000, seed=3)
    skim = {**DEMO_SKIM, "chunksize": 700}
    local = Skimmer(skim).run({"ttbar": {"files": {str(path): "Events"}}})
    script = tmp_path / "skim_on_slurm.py"
    script.write_text(SLURM_SKIM)
    out = tmp_path / "slurm.pkl"
    args = (json.dumps(skim), str(path), str(out), slurm_cluster.partition)
    slurm_cluster.python(script, *args, cwd=tmp_path, timeout=240)
    with open(out, "rb") as f:
        remote = pickle.load(f)  # written by this test's own script

    assert remote["cutflow"] == local.cutflow
    assert local.cutflow["ttbar"]["all"]["events"] == 3000
    assert len(remote["arrays"]["ttbar"]) == len(local.arrays["ttbar"]) > 100
    assert ak.to_list(remote["arrays"]["ttbar"]) == ak.to_list(local.arrays["ttbar"])
    # the chunks ran in SLURM jobs: dask-jobqueue's worker logs are there, one per job
    logs = sorted((tmp_path / "logs").glob("*.err"))
    assert len(logs) == 2, logs
    assert all("distributed.worker" in log.read_text() for log in logs)


# --------------------------------------------------------------------------- faults


def _slow_chunk(events):
    """Record (pid, chunk) where this chunk runs, then take long enough to be killed in."""
    meta = events.metadata
    with open(os.environ["CMSML_TEST_CHUNK_LOG"], "a") as f:
        f.write(f"{os.getpid()} {meta['entrystart']} {meta['entrystop']}\n")
    time.sleep(0.6)
    return events


@pytest.mark.slow
def test_chunks_of_a_killed_worker_are_rerun(tmp_path, monkeypatch):
    import cloudpickle
    from distributed import Client, LocalCluster

    from cmsmlkit import Skimmer
    from cmsmlkit.data import toy

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    chunk_log = tmp_path / "chunks.txt"
    monkeypatch.setenv("CMSML_TEST_CHUNK_LOG", str(chunk_log))
    path = toy.write_nanoaod(tmp_path / "ttbar.root", "ttbar", 3000, seed=5)
    fileset = {"ttbar": {"files": {str(path): "Events"}}}
    skim = {**DEMO_SKIM, "chunksize": 250}  # 12 chunks
    reference = Skimmer(skim).run(fileset)

    killed: list[tuple[int, str]] = []

    def kill_a_busy_worker(pids: set[int]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = chunk_log.read_text().splitlines() if chunk_log.exists() else []
            if len(lines) >= 3:
                pid, *chunk = lines[-1].split()
                if int(pid) in pids:  # asleep in that chunk right now
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append((int(pid), " ".join(chunk)))
                    return
            time.sleep(0.02)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            pids = set(client.run(os.getpid).values())
        assert len(pids) == 2
        killer = threading.Thread(target=kill_a_busy_worker, args=(pids,))
        killer.start()
        cfg = ClusterConfig(type="address", address=cluster.scheduler_address)
        result = Skimmer(skim, cluster=cfg, function=_slow_chunk).run(fileset)
        killer.join()

    assert killed, "no worker was killed mid-run"
    pid, chunk = killed[0]
    runs = [line.split() for line in chunk_log.read_text().splitlines()]
    again = [int(p) for p, *c in runs if " ".join(c) == chunk]
    assert again[0] == pid and len(again) >= 2 and again[-1] != pid  # re-run elsewhere
    assert len({" ".join(c) for _, *c in runs}) == 12
    flow = dict(result.cutflow["ttbar"])
    assert flow.pop("function _slow_chunk")["events"] == 3000  # every event, exactly once
    assert flow == reference.cutflow["ttbar"]
    assert ak.to_list(result.arrays["ttbar"]) == ak.to_list(reference.arrays["ttbar"])


def test_address_reuses_this_process_client_to_that_scheduler():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as mine:
            config = ClusterConfig(type="address", address=cluster.scheduler_address)
            with dask_client(config) as client:
                assert client is mine
                assert client.submit(sum, [1, 2]).result() == 3
            assert mine.status == "running"  # not closed: it is the caller's
        # without a client of its own, a new one is made (and closed)
        with dask_client(config) as client:
            assert client is not mine
            assert client.submit(sum, [2, 2]).result() == 4
