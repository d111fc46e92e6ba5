"""Batch jobs that outlive the notebook: ``cmsml submit`` and ``cmsml jobs``.

:func:`submit` turns one stage of a pipeline YAML (``skim``, ``convert``,
``train``, ``tune``, ``predict``, or ``run`` for all of them) into a job on
HTCondor or SLURM. It writes a job directory holding

- ``config.yaml``: the pipeline with every path made absolute, the stage's
  outputs pointed at the worker's local scratch disk;
- ``run.sh``: the wrapper (bash, ``set -euo pipefail``) that sets up the
  environment (an LCG view, an Apptainer image, or a virtual environment on a
  shared filesystem), runs ``cmsml STAGE config.yaml`` in a scratch directory,
  copies the outputs to where the config says (``cp``, or ``xrdcp`` for
  ``root://`` and ``/eos/``) and exits with the stage's exit code, the error
  repeated on the last line of the log;
- ``job.sub`` (HTCondor) or ``job.sbatch`` (SLURM): the submit description;
- ``job.json``: the record that ``cmsml jobs`` lists (also copied to the
  registry, ``~/.cmsmlkit/jobs`` or ``$CMSMLKIT_JOBS``);

and submits it with ``condor_submit`` or ``sbatch`` (not with ``dry_run``).

>>> from cmsmlkit.submit import submit
>>> job = submit("train", "pipeline.yaml", scheduler="slurm", gpus=1, dry_run=True)  # doctest: +SKIP
>>> job.submit_file.name  # doctest: +SKIP
'job.sbatch'
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .cluster import grid_proxy
from .config import STAGES, SubmitConfig, build_config, dump_yaml
from .data.source import is_das_dataset, is_remote
from .errors import ConfigError, ProxyError, SubmitError, did_you_mean
from .pipeline import NEEDS, Pipeline

__all__ = [
    "SUBMIT_STAGES",
    "Job",
    "SubmitError",
    "ProxyError",
    "submit",
    "jobs",
    "registry_dir",
    "format_jobs",
    "add_parsers",
    "run_command",
]

#: What can be submitted: every stage, and ``run`` for the whole pipeline.
SUBMIT_STAGES = (*STAGES, "run")


# --------------------------------------------------------------------------- units


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_MB = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2}
_TIME = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_TIME_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _megabytes(value: str | int, key: str) -> int:
    """A size (``4GB``, ``500MB``, ``2G``; a bare number is MB) in MB."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ConfigError(
            f"submit.{key}: cannot read {value!r} as a size; write e.g. 4GB, 500MB or 2048 (MB)."
        )
    return max(1, round(float(match[1]) * _SIZE_MB[match[2].lower()]))


def _seconds(value: str | int, key: str) -> int:
    """A duration (``90m``, ``2h``, ``1d``, ``1:30:00``, ``45:00``; a bare number is s)."""
    if isinstance(value, int):
        return value
    if ":" in value:
        parts = value.strip().split(":")
        if len(parts) in (2, 3) and all(p.isdigit() for p in parts):
            h, m, s = ([0] * (3 - len(parts))) + [int(p) for p in parts]
            if len(parts) == 2:  # H:MM reads as hours and minutes
                h, m, s = m, s, 0
            return h * 3600 + m * 60 + s
    match = _TIME.match(value)
    if not match:
        raise ConfigError(
            f"submit.{key}: cannot read {value!r} as a duration; write e.g. 90m, 2h, 1d or 1:30:00."
        )
    return round(float(match[1]) * _TIME_S[match[2].lower()])


def _hms(seconds: int) -> str:
    """SLURM's ``--time`` form, ``D-HH:MM:SS``."""
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


# --------------------------------------------------------------------------- proxy


def _checked_proxy(config: SubmitConfig, why: str) -> Path:
    """The GRID proxy (``submit.proxy``, ``$X509_USER_PROXY``, ``/tmp/x509up_u<uid>``),
    refused with the renewal command when missing or expired."""
    try:
        return grid_proxy(config.proxy)
    except ConfigError as exc:
        raise ProxyError(f"{why}, so the job needs a GRID proxy: {exc}") from None


# --------------------------------------------------------------------------- the job record


def registry_dir() -> Path:
    """The directory where every submitted job leaves its record: ``$CMSMLKIT_JOBS`` or
    ``~/.cmsmlkit/jobs``."""
    env = os.environ.get("CMSMLKIT_JOBS")
    return Path(env).expanduser() if env else Path.home() / ".cmsmlkit" / "jobs"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class Job:
    """A batch job written (and, unless a dry run, submitted) by :func:`submit`.

    ``outputs`` maps each output destination to the file that shows it is
    complete (``bundle.json`` of a bundle, the HDF5 file, a directory).

    >>> job = Job.load("jobs/train-20250101-120000-ab12")  # doctest: +SKIP
    >>> job.state()  # doctest: +SKIP
    'completed'
    """

    name: str
    stage: str
    scheduler: str
    config: str
    job_dir: str
    submitted: str
    job_id: str | None = None
    dry_run: bool = False
    outputs: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.job_dir)

    @property
    def submit_file(self) -> Path:
        """``job.sub`` (HTCondor) or ``job.sbatch`` (SLURM)."""
        return self.dir / ("job.sub" if self.scheduler == "htcondor" else "job.sbatch")

    @property
    def wrapper(self) -> Path:
        return self.dir / "run.sh"

    @property
    def log(self) -> Path:
        """The job's log: the stage's output and errors, the error last when it fails."""
        return self.dir / "job.out"

    @property
    def submit_command(self) -> str:
        tool = "condor_submit" if self.scheduler == "htcondor" else "sbatch"
        return f"cd {shlex.quote(self.job_dir)} && {tool} {self.submit_file.name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self) -> None:
        """Write ``job.json`` into the job directory and the registry (atomically)."""
        _write_json(self.dir / "job.json", self.to_dict())
        _write_json(registry_dir() / f"{self.name}.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Job:
        """Read a job record: a job directory, or a ``job.json`` / registry file."""
        path = Path(path)
        if path.is_dir():
            path = path / "job.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SubmitError(f"cannot read the job record {path}: {exc}") from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    # ------------------------------------------------------------------ state

    def exit_code(self) -> int | None:
        """The exit code the wrapper recorded in the job directory, if it finished and could."""
        try:
            return int((self.dir / "exit_code").read_text().strip())
        except (OSError, ValueError):
            return None

    def state(self) -> str:
        """``pending``, ``running``, ``completed``, ``failed``, ``held``, ``cancelled``,
        ``not submitted`` (a dry run) or ``unknown``.

        Asks the scheduler (``squeue``/``sacct``/``scontrol``; ``condor_q``/
        ``condor_history``) where its tools are on PATH, then the exit code the
        wrapper left in the job directory, then (HTCondor) the job's event log.
        """
        if self.dry_run or not self.job_id:
            return "not submitted"
        if self.scheduler == "slurm":
            live = _slurm_state(self.job_id)
        else:
            live = _condor_state(self.job_id)
        if live in ("pending", "running", "held"):
            return live
        code = self.exit_code()
        if code is not None:
            return "completed" if code == 0 else "failed"
        if live is not None:
            return live
        if self.scheduler == "htcondor":
            return _condor_log_state(self.dir / "job.log") or "unknown"
        return "unknown"

    def found_outputs(self) -> dict[str, list[str]]:
        """Each output destination -> the files found there (empty when missing).

        A bundle shows its ``bundle.json``, a directory of HDF5 files its ``*.h5``,
        a file itself; ``root://`` destinations are looked up with ``xrdfs`` when
        it is installed (otherwise they show as not found).
        """
        found: dict[str, list[str]] = {}
        for dest in self.outputs:
            found[dest] = _found(dest)
        return found

    def __repr__(self) -> str:
        where = f"job_id={self.job_id!r}" if self.job_id else "dry_run=True"
        return (
            f"Job({self.name!r}, stage={self.stage!r}, scheduler={self.scheduler!r}, {where}, "
            f"job_dir={self.job_dir!r})"
        )


def _found(dest: str) -> list[str]:
    if dest.startswith("root://"):
        match = re.match(r"^(root://[^/]+)/(/.*)$", dest)
        found = match and _run_tool(["xrdfs", match[1], "stat", match[2]]) is not None
        return [dest] if found else []
    path = Path(dest)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        return []
    for marker in ("bundle.json", "best/bundle.json"):
        if (path / marker).is_file():
            return [str(path / marker)]
    return sorted(str(p) for p in path.rglob("*.h5")) or sorted(str(p) for p in path.iterdir())


def _run_tool(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


_SLURM_STATES = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "pending",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "held",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "TIMEOUT": "failed",
    "BOOT_FAIL": "failed",
    "PREEMPTED": "failed",
    "CANCELLED": "cancelled",
}


def _slurm_state(job_id: str) -> str | None:
    """squeue (queued or running), else sacct (accounting), else scontrol (recently ended)."""
    asks = (
        lambda: _run_tool(["squeue", "-h", "-j", job_id, "-o", "%T"]),
        lambda: _run_tool(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]),
        lambda: "".join(
            re.findall(r"JobState=(\S+)", _run_tool(["scontrol", "show", "job", job_id]) or "")
        ),
    )
    for ask in asks:
        word = ask()
        if word:
            state = word.split()[0].upper().rstrip("+")
            return _SLURM_STATES.get(state, state.lower())
    return None


# HTCondor JobStatus codes: https://htcondor.readthedocs.io (ClassAd attribute JobStatus)
_CONDOR_STATUS = {
    "1": "pending",
    "2": "running",
    "3": "cancelled",
    "4": "completed",
    "5": "held",
    "6": "running",
    "7": "held",
}


def _condor_state(job_id: str) -> str | None:
    queued = _run_tool(["condor_q", job_id, "-af", "JobStatus"])
    if queued:
        return _CONDOR_STATUS.get(queued.split()[0])
    history = _run_tool(["condor_history", job_id, "-limit", "1", "-af", "JobStatus", "ExitCode"])
    if history:
        words = history.split()
        state = _CONDOR_STATUS.get(words[0])
        if state == "completed" and len(words) > 1 and words[1] not in ("0", "undefined"):
            return "failed"
        return state
    return None


def _condor_log_state(path: Path) -> str | None:
    """The state from HTCondor's job event log (``log =``), which the schedd writes on the
    submit host; the last event decides."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    state = None
    events = re.split(r"^(?=\d{3} \()", text, flags=re.M)
    for event in events:
        code = event[:3]
        if code == "000":
            state = "pending"
        elif code in ("001", "013"):
            state = "running"
        elif code == "012":
            state = "held"
        elif code == "009":
            state = "cancelled"
        elif code == "005":
            value = re.search(r"return value (\d+)", event)
            state = "completed" if value and value[1] == "0" else "failed"
    return state


# --------------------------------------------------------------------------- the worker config


class _Plan:
    """What one job does: the worker's config, the outputs to copy, the inputs it reads."""

    def __init__(
        self, pipeline: Pipeline, config_path: Path, stage: str, config: SubmitConfig
    ) -> None:
        self.pipeline = pipeline
        self.config_path = config_path
        self.stage = stage
        self.config = config
        self.stages = pipeline.stages() if stage == "run" else [stage]
        self.deliveries: list[tuple[str, str]] = []  # (local name in scratch, destination)
        self.outputs: list[str] = []  # destinations, for `cmsml jobs`
        self.remote_inputs: list[str] = []
        self.missing_inputs: list[str] = []
        self.local_inputs: list[str] = []
        self.transfers: dict[str, str] = {}  # name on the worker -> local input file
        self.stamps: dict[str, str] = {}  # stage -> its output, for the pipeline's done-record
        self.data = self._worker_config()

    def destination(self, value: str) -> str:
        """Where an output goes: a URL as it is, /eos/ as an XRootD URL, else an absolute path."""
        if is_remote(value):
            return value
        path = str(self.pipeline.path(value))
        if path.startswith("/eos/"):
            url = self.config.eos_url or (
                "root://eoscms.cern.ch/"
                if path.startswith("/eos/cms/")
                else "root://eosuser.cern.ch/"
            )
            return url.rstrip("/") + "/" + path
        return path

    def _local_for(self, path: str) -> str | None:
        """The scratch name of ``path`` when this job writes it (or writes a directory above it)."""
        for local, dest in self.deliveries:
            if path == dest:
                return local
            if path.startswith(dest.rstrip("/") + "/"):
                return local + path[len(dest.rstrip("/")) :]
        return None

    def _input(self, value: str, key: str, *, check: bool = True) -> str:
        if value.startswith("/store/") or is_das_dataset(value) or is_remote(value):
            if value.startswith(("root://", "/store/")) or is_das_dataset(value):
                self.remote_inputs.append(f"{key}: {value}")
            return value
        path = str(self.pipeline.path(value))
        local = self._local_for(path)
        if local is not None:
            return local
        if path.startswith("/eos/") and not Path("/eos").is_dir():
            check = False  # read through the EOS mount of the worker; not mounted here
        if check and not (glob.glob(path) if glob.has_magic(path) else Path(path).exists()):
            self.missing_inputs.append(f"{key}: {path}")
        self.local_inputs.append(path)
        return self._shipped(path) if self.config.transfer_inputs else path

    def _shipped(self, path: str) -> str:
        """An input HTCondor transfers: listed for transfer, named ``in/<name>`` on the worker."""
        for file in sorted(glob.glob(path)) if glob.has_magic(path) else [path]:
            name = Path(file).name
            other = self.transfers.setdefault(name, file)
            if other != file:
                raise ConfigError(
                    f"submit.transfer_inputs: two inputs are named {name!r} ({other} and {file}) "
                    "and would land in one directory on the worker. Rename one, or read them in "
                    "place from a shared filesystem (transfer_inputs: false)."
                )
        return f"in/{Path(path).name}"

    def _worker_config(self) -> dict[str, Any]:
        cfg = self.pipeline.config
        data = cfg.to_dict(full=False)
        data.pop("submit", None)
        if self.stage == "skim" and cfg.skim is not None and cfg.skim.output is None:
            raise ConfigError(
                "skim.output is not set: a skim submitted as a job must write its result "
                "somewhere; set skim.output (a directory), or submit 'convert' instead."
            )
        # outputs first, so that inputs written by an earlier stage of the same job map to scratch
        for index, section in enumerate(self.stages):  # every stage has an `output:`
            value = getattr(getattr(cfg, section), "output", None)
            if value is None:
                continue
            dest = self.destination(value)
            local = f"out{index}/{Path(dest.rstrip('/')).name}"
            data[section]["output"] = local
            self.deliveries.append((local, dest))
            marker = {"train": "/bundle.json", "tune": "/best/bundle.json"}.get(section, "")
            self.outputs.append(dest + marker)
            if not is_remote(dest):
                self.stamps[section] = dest + marker
        reads = set(self.stages)
        for stage in self.stages:
            reads.update(NEEDS[stage])
        if "convert" in reads and cfg.convert is not None:
            # convert skims in memory with the skim: selection, or streams convert.inputs
            if cfg.skim is not None:
                reads.update(("skim", "source"))
            elif not cfg.convert.inputs:
                reads.add("source")
            elif "convert" in self.stages:
                data["convert"]["inputs"] = {
                    label: [self._input(f, f"convert.inputs.{label}") for f in files]
                    for label, files in cfg.convert.inputs.items()
                }
        if "source" in reads and cfg.source is not None:
            for name, dataset in cfg.source.datasets.items():
                data["source"]["datasets"][name]["files"] = [
                    self._input(f, f"source.datasets.{name}.files") for f in dataset.files
                ]
        if "train" in reads and cfg.train is not None:
            inputs = list(cfg.train.inputs)
            if not inputs and cfg.convert is not None:
                inputs = [cfg.convert.output]
            data["train"]["inputs"] = [self._input(i, "train.inputs") for i in inputs]
            tracking = cfg.train.tracking
            train_dest = self.destination(cfg.train.output)
            if tracking.enabled and tracking.uri is None and not is_remote(train_dest):
                # the default store sits beside the output: keep it beside the destination
                from .tracking import default_uri

                data["train"].setdefault("tracking", {})["uri"] = default_uri(
                    Path(train_dest).parent
                )
        if "predict" in reads and cfg.predict is not None:
            data["predict"]["bundle"] = self._input(cfg.predict.bundle, "predict.bundle")
            data["predict"]["inputs"] = [
                self._input(i, "predict.inputs") for i in cfg.predict.inputs
            ]
        for section in ("source", "skim", "convert", "train", "tune", "predict"):
            if section not in reads:
                data.pop(section, None)
        return data


# --------------------------------------------------------------------------- writing


def _default_venv() -> str | None:
    """The virtual environment this Python runs in, if it is one."""
    return sys.prefix if sys.prefix != sys.base_prefix else None


def _wrapper(plan: _Plan, job_dir: Path, name: str) -> str:
    cfg = plan.config
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# cmsmlkit batch job {name}: `cmsml {plan.stage}` of {plan.config_path}",
        "# Written by `cmsml submit`; the job's exit code is the stage's.",
        "set -euo pipefail",
        "exec 2>&1  # one log, in order: the stage's error ends up last",
        "",
        f"JOB_DIR={q(str(job_dir))}",
        f"STAGE={q(plan.stage)}",
        'START_DIR="$PWD"',
        'echo "cmsml-job: $STAGE on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"',
        "",
        "# the GRID proxy travels with the job; the scheduler names it relative to the start dir",
        'if [ -n "${X509_USER_PROXY:-}" ]; then',
        '  case "$X509_USER_PROXY" in /*) ;; *) X509_USER_PROXY="$START_DIR/$X509_USER_PROXY" ;; esac',
        "  export X509_USER_PROXY",
        "fi",
        "",
        "# the config: shipped into the start dir (HTCondor) or read from the job dir (SLURM)",
        'CONFIG="$START_DIR/config.yaml"',
        '[ -f "$CONFIG" ] || CONFIG="$JOB_DIR/config.yaml"',
        "",
        "# outputs are written on the worker's local disk first",
        'SCRATCH_BASE="${_CONDOR_SCRATCH_DIR:-${TMPDIR:-/tmp}}"',
        'SCRATCH="$(mktemp -d "$SCRATCH_BASE/cmsml-$STAGE.XXXXXX")"',
        "finish() {",
        "  local rc=$?",
        '  cd / && rm -rf "$SCRATCH"',
        "  # the exit code, for `cmsml jobs` (where the job dir is reachable from the worker)",
        '  if [ -d "$JOB_DIR" ] && [ -w "$JOB_DIR" ]; then',
        '    echo "$rc" > "$JOB_DIR/exit_code.tmp.$$" && mv -f "$JOB_DIR/exit_code.tmp.$$" '
        '"$JOB_DIR/exit_code" || true',
        "  fi",
        '  exit "$rc"',
        "}",
        "trap finish EXIT",
        'cp "$CONFIG" "$SCRATCH/config.yaml"',
        'cd "$SCRATCH"',
    ]
    locals_ = sorted({str(Path(local).parent) for local, _ in plan.deliveries})
    if locals_:
        lines.append("mkdir -p " + " ".join(q(d) for d in locals_))
    if plan.transfers:
        lines += ["# the inputs HTCondor brought along", "mkdir -p in"]
        lines += [f'mv -f "$START_DIR"/{q(name)} in/' for name in plan.transfers]
    lines += [
        "",
        "# the environment, then the stage",
        "stage() {",
        "  set +u  # setup scripts read unset variables",
    ]
    if cfg.lcg_view:
        lines.append(f"  source {q(cfg.lcg_view.rstrip('/') + '/setup.sh')}")
    venv = cfg.venv or (None if (cfg.lcg_view or cfg.container) else _default_venv())
    if venv:
        lines.append(f"  source {q(str(Path(venv) / 'bin' / 'activate'))}")
    elif not (cfg.lcg_view or cfg.container):
        lines.append(f'  export PATH={q(str(Path(sys.executable).parent))}:"$PATH"')
    lines += ["  set -u", f"  cmsml {q(plan.stage)} config.yaml", "}"]
    if cfg.container:
        binds = ["$SCRATCH", "$JOB_DIR", "/cvmfs", *cfg.binds]
        binds += sorted(
            {"/" + Path(p).parts[1] for _, p in plan.deliveries if p.startswith("/")}
            | {"/" + Path(p).parts[1] for p in plan.local_inputs if p.startswith("/")}
        )
        lines += [
            "APPTAINER=$(command -v apptainer || command -v singularity || true)",
            '[ -n "$APPTAINER" ] || { echo "cmsml-job: neither apptainer nor singularity is on '
            'PATH of $(hostname)"; exit 127; }',
            "BINDS=()",
            "for path in "
            + " ".join(f'"{b}"' if b.startswith("$") else q(b) for b in dict.fromkeys(binds))
            + "; do",
            '  if [ -e "$path" ]; then BINDS+=(--bind "$path"); fi',
            "done",
            "run_stage() {",
            f'  "$APPTAINER" exec "${{BINDS[@]}}" --pwd "$SCRATCH" {q(cfg.container)} '
            'bash -c "$(declare -f stage); set -euo pipefail; stage"',
            "}",
        ]
    else:
        lines += ["run_stage() { stage; }"]
    lines += [
        "",
        "status=0",
        "run_stage 2>&1 | tee cmsml.log || status=$?",
        'if [ "$status" -ne 0 ]; then',
        '  error=$(grep -v "^[[:space:]]*$" cmsml.log | tail -n 1 || true)',
        '  echo "cmsml-job: FAILED: \\`cmsml $STAGE\\` exited with code $status: $error"',
        '  exit "$status"',
        "fi",
        "",
        "# copy each output to its destination: replace it whole, or not at all",
        "deliver() {",
        '  local src="$1" dest="$2"',
        '  if [ ! -e "$src" ]; then',
        '    echo "cmsml-job: FAILED: the stage wrote no $src (meant for $dest)"; return 3',
        "  fi",
        '  case "$dest" in',
        "    root://*)",
        '      if [ -d "$src" ]; then xrdcp --force --recursive --path --nopbar "$src" "${dest%/*}/"',
        '      else xrdcp --force --path --nopbar "$src" "$dest"; fi ;;',
        "    *)",
        '      mkdir -p "$(dirname "$dest")"',
        '      local tmp="$dest.part-$$"',
        '      rm -rf "$tmp" && cp -r "$src" "$tmp" && rm -rf "$dest" && mv "$tmp" "$dest" ;;',
        "  esac",
        '  echo "cmsml-job: $src -> $dest"',
        "}",
    ]
    lines += [f"deliver {q(local)} {q(dest)}" for local, dest in plan.deliveries]
    if plan.stamps:
        lines += ["", "# record the stages as done, so that `cmsml run` there skips them"]
    for stage, output in plan.stamps.items():
        # the same record Pipeline writes: the hash of the submitted config, the output
        stamp = plan.pipeline.stamp_path(stage)
        record = {
            "stage": stage,
            "hash": plan.pipeline.stage_hash(stage),
            "outputs": [output],
            "job": name,
        }
        tmp = q(f"{stamp}.tmp") + ".$$"
        lines += [
            f"if mkdir -p {q(str(stamp.parent))} 2>/dev/null; then",
            f"  cat > {tmp} <<'CMSML_STAMP' && mv -f {tmp} {q(str(stamp))} || "
            f'echo "cmsml-job: could not write {stamp}"',
            json.dumps(record),
            "CMSML_STAMP",
            "fi",
        ]
    lines += ['echo "cmsml-job: done"', ""]
    return "\n".join(lines)


def _condor_quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _condor_sub(plan: _Plan, job_dir: Path, name: str, proxy: Path | None) -> str:
    cfg = plan.config
    lines = [
        f"# cmsmlkit batch job {name}: `cmsml {plan.stage}` of {plan.config_path}",
        "universe                = vanilla",
        f"executable              = {job_dir / 'run.sh'}",
        f"initialdir              = {job_dir}",
        "output                  = job.out",
        "error                   = job.err",
        "log                     = job.log",
        "getenv                  = false",
        "should_transfer_files   = YES",
        "when_to_transfer_output = ON_EXIT",
    ]
    shipped = [str(job_dir / "config.yaml"), *plan.transfers.values()]
    if proxy is not None:
        shipped.append(str(proxy))
        lines += [
            f"x509userproxy           = {proxy}",
            f'environment             = "X509_USER_PROXY={proxy.name}"',
        ]
    lines += [
        f"transfer_input_files    = {', '.join(shipped)}",
        "# the wrapper copies the outputs itself (cp / xrdcp); nothing comes back by HTCondor",
        'transfer_output_files   = ""',
        f"request_cpus            = {cfg.cpus}",
    ]
    if cfg.memory is not None:
        lines.append(f"request_memory          = {_megabytes(cfg.memory, 'memory')}")
    if cfg.disk is not None:
        lines.append(f"request_disk            = {_megabytes(cfg.disk, 'disk') * 1024}")
    if cfg.gpus:
        lines.append(f"request_gpus            = {cfg.gpus}")
    lines.append(f"MY.JobFlavour           = {_condor_quote(cfg.job_flavour)}")
    if cfg.max_runtime is not None:
        lines.append(f"MY.MaxRuntime           = {_seconds(cfg.max_runtime, 'max_runtime')}")
    lines.append(f"max_retries             = {cfg.max_retries}")
    lines += [*cfg.extra, f"batch_name              = {name}", "queue 1", ""]
    return "\n".join(lines)


def _slurm_script(plan: _Plan, job_dir: Path, name: str, proxy: Path | None) -> str:
    cfg = plan.config
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --chdir={job_dir}",
        f"#SBATCH --output={job_dir / 'job.out'}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cfg.cpus}",
    ]
    if cfg.memory is not None:
        lines.append(f"#SBATCH --mem={_megabytes(cfg.memory, 'memory')}M")
    if cfg.disk is not None:
        lines.append(f"#SBATCH --tmp={_megabytes(cfg.disk, 'disk')}M")
    if cfg.gpus:
        lines.append(f"#SBATCH --gres=gpu:{cfg.gpus}")
    if cfg.max_runtime is not None:
        lines.append(f"#SBATCH --time={_hms(_seconds(cfg.max_runtime, 'max_runtime'))}")
    if cfg.partition:
        lines.append(f"#SBATCH --partition={cfg.partition}")
    if cfg.account:
        lines.append(f"#SBATCH --account={cfg.account}")
    lines.append("#SBATCH --requeue" if cfg.requeue else "#SBATCH --no-requeue")
    lines += cfg.extra
    lines.append(f"# cmsmlkit batch job {name}: `cmsml {plan.stage}` of {plan.config_path}")
    if proxy is not None:
        lines.append(f"export X509_USER_PROXY={shlex.quote(str(proxy))}")
    lines += [f"exec bash {shlex.quote(str(job_dir / 'run.sh'))}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- submit


def submit(
    stage: str,
    config_path: str | Path,
    *,
    scheduler: str | None = None,
    dry_run: bool = False,
    **resources: Any,
) -> Job:
    """Write a batch job for ``stage`` of the pipeline YAML ``config_path``, and submit it.

    Parameters
    ----------
    stage
        ``skim``, ``convert``, ``train``, ``tune``, ``predict``, or ``run`` (every
        stage configured in the file, in one job).
    config_path
        The pipeline YAML. Its ``submit:`` section, if any, gives the defaults.
    scheduler
        ``htcondor`` or ``slurm``; none takes ``submit.scheduler``.
    dry_run
        Write the job directory but do not submit.
    **resources
        Any :class:`~cmsmlkit.config.SubmitConfig` field (``cpus``, ``memory``,
        ``gpus``, ``job_flavour``, ``max_runtime``, ``partition``, ...); they
        override the YAML's.

    Returns
    -------
    Job
        The job record, with its ``job_id`` once submitted.

    Raises
    ------
    ConfigError
        The stage, a resource or an input path is wrong.
    ProxyError
        The stage reads ``root://`` inputs and the GRID proxy is missing or expired.
    SubmitError
        ``condor_submit``/``sbatch`` is not there, or refused the job.

    Examples
    --------
    >>> job = submit("train", "pipeline.yaml", scheduler="htcondor",  # doctest: +SKIP
    ...              gpus=1, job_flavour="tomorrow")
    >>> print(job.submit_file.read_text())  # doctest: +SKIP
    """
    if stage not in SUBMIT_STAGES:
        raise ConfigError(
            f"cannot submit stage {stage!r}: stages are {', '.join(SUBMIT_STAGES)}."
            + did_you_mean(stage, SUBMIT_STAGES)
        )
    config_path = Path(config_path).resolve()
    pipeline = Pipeline(config_path)
    overrides = {k: v for k, v in resources.items() if v is not None}
    if scheduler is not None:
        overrides["scheduler"] = scheduler
    unknown = [k for k in overrides if k not in SubmitConfig.model_fields]
    if unknown:
        raise ConfigError(
            f"unknown job setting {unknown[0]!r}."
            + did_you_mean(unknown[0], SubmitConfig.model_fields)
            + f" Settings: {', '.join(SubmitConfig.model_fields)}."
        )
    config = build_config(SubmitConfig, pipeline.config.submit, overrides)
    # read every size and time now, so that a typo fails here and not on the worker
    for key in ("memory", "disk"):
        if getattr(config, key) is not None:
            _megabytes(getattr(config, key), key)
    if config.max_runtime is not None:
        _seconds(config.max_runtime, "max_runtime")
    if stage != "run":
        missing = [s for s in NEEDS[stage] if getattr(pipeline.config, s) is None]
        convert = pipeline.config.convert
        if (
            stage == "convert"
            and pipeline.config.source is None
            and not (convert and convert.inputs)
        ):
            missing.append("source")
        if missing:
            raise ConfigError(
                f"{config_path}: stage '{stage}' needs the section(s) "
                f"{', '.join(repr(m + ':') for m in missing)}."
            )
    elif not pipeline.stages():
        raise ConfigError(f"{config_path}: no stage is configured, so `run` has nothing to do.")

    if config.transfer_inputs and config.scheduler != "htcondor":
        raise ConfigError(
            "submit.transfer_inputs is for HTCondor; SLURM jobs read their inputs in place "
            "from the shared filesystem, so leave it false."
        )
    plan = _Plan(pipeline, config_path, stage, config)
    if plan.missing_inputs:
        raise ConfigError(
            f"{config_path}: the job would read inputs that do not exist:\n  - "
            + "\n  - ".join(plan.missing_inputs)
            + "\nFix the paths, or run the stage that writes them first."
        )
    proxy: Path | None = None
    if plan.remote_inputs:
        proxy = _checked_proxy(config, f"the stage reads {plan.remote_inputs[0]}")
    elif any(dest.startswith("root://") for _, dest in plan.deliveries):
        try:  # copying to EOS: ship a valid proxy when there is one
            proxy = grid_proxy(config.proxy)
        except ConfigError:
            proxy = None

    now = datetime.now(timezone.utc)
    name = f"cmsml-{stage}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    root = pipeline.path(config.job_dir)
    job_dir = root / name
    job_dir.mkdir(parents=True)
    if proxy is not None and config.scheduler == "slurm":
        # SLURM reads files in place: keep a private copy where every node sees it
        shipped = job_dir / "x509up"
        fd = os.open(shipped, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(proxy.read_bytes())
        proxy = shipped
    (job_dir / "config.yaml").write_text(
        f"# worker config of {name}, from {config_path}\n" + dump_yaml(plan.data)
    )
    wrapper = job_dir / "run.sh"
    wrapper.write_text(_wrapper(plan, job_dir, name))
    wrapper.chmod(0o755)
    job = Job(
        name=name,
        stage=stage,
        scheduler=config.scheduler,
        config=str(config_path),
        job_dir=str(job_dir),
        submitted=now.isoformat(timespec="seconds"),
        dry_run=dry_run,
        outputs=plan.outputs,
    )
    render = _condor_sub if config.scheduler == "htcondor" else _slurm_script
    job.submit_file.write_text(render(plan, job_dir, name, proxy))
    if not dry_run:
        job.job_id = _submit(job)
    job.save()
    return job


def _submit(job: Job) -> str:
    tool, argv = (
        ("condor_submit", ["condor_submit", job.submit_file.name])
        if job.scheduler == "htcondor"
        else ("sbatch", ["sbatch", "--parsable", job.submit_file.name])
    )
    if shutil.which(tool) is None:
        raise SubmitError(
            f"`{tool}` is not on PATH, so the job was written but not submitted: {job.job_dir}. "
            f"Submit it from a {job.scheduler} submit node with `{job.submit_command}`, "
            "or pass --dry-run to only write it."
        )
    done = subprocess.run(argv, cwd=job.dir, capture_output=True, text=True, check=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise SubmitError(
            f"`{' '.join(argv)}` in {job.job_dir} failed (exit code {done.returncode}):\n{output}"
        )
    match = (
        re.search(r"submitted to cluster (\d+)", output)
        if job.scheduler == "htcondor"
        else re.match(r"^(\d+)", done.stdout.strip())
    )
    if not match:
        raise SubmitError(f"`{' '.join(argv)}` said {output!r}, which holds no job id.")
    return match[1]


# --------------------------------------------------------------------------- listing


def jobs(limit: int | None = None) -> list[Job]:
    """The jobs in the registry (:func:`registry_dir`) whose job directory exists, newest first."""
    records = []
    for path in registry_dir().glob("*.json"):
        try:
            job = Job.load(path)
        except SubmitError:
            continue  # a record half-written by a crash; the next submit is not blocked by it
        if job.dir.is_dir():  # a deleted job directory takes its job off the list
            records.append(job)
    records.sort(key=lambda j: (j.submitted, j.name), reverse=True)
    return records[:limit] if limit else records


def format_jobs(listed: list[Job]) -> str:
    """The table ``cmsml jobs`` prints: one line per job, outputs below the finished ones."""
    if not listed:
        return f"no jobs in {registry_dir()} (submit one with `cmsml submit STAGE CONFIG`)"
    header = f"{'JOB ID':<10} {'SCHEDULER':<9} {'STAGE':<8} {'STATE':<13} {'SUBMITTED':<25} JOB DIR"
    lines = [header]
    for job in listed:
        state = job.state()
        lines.append(
            f"{job.job_id or '-':<10} {job.scheduler:<9} {job.stage:<8} {state:<13} "
            f"{job.submitted:<25} {job.job_dir}"
        )
        if state in ("completed", "failed", "unknown"):
            for dest, found in job.found_outputs().items():
                if found:
                    lines += [f"    output: {f}" for f in found]
                else:
                    lines.append(f"    output: {dest} (missing)")
        if state == "failed":
            lines.append(f"    log:    {job.log}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command line

_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--cpus", {"type": int, "metavar": "N", "help": "CPU cores"}),
    ("--memory", {"metavar": "SIZE", "help": "memory, e.g. 4GB"}),
    ("--disk", {"metavar": "SIZE", "help": "local scratch disk, e.g. 20GB"}),
    ("--gpus", {"type": int, "metavar": "N", "help": "GPUs"}),
    (
        "--job-flavour",
        {
            "choices": SubmitConfig.model_fields["job_flavour"].annotation.__args__,  # type: ignore[union-attr]
            "help": "HTCondor job flavour (CERN), e.g. longlunch, workday, tomorrow",
        },
    ),
    ("--max-runtime", {"metavar": "TIME", "help": "wall-time limit, e.g. 90m, 2h, 1:30:00"}),
    ("--partition", {"help": "SLURM partition"}),
    ("--account", {"help": "SLURM account"}),
    ("--max-retries", {"type": int, "metavar": "N", "help": "HTCondor: retries on failure"}),
    (
        "--requeue",
        {"action": argparse.BooleanOptionalAction, "help": "SLURM: requeue after node failure"},
    ),
    ("--lcg-view", {"metavar": "PATH", "help": "LCG view to source on the worker"}),
    ("--container", {"metavar": "IMAGE", "help": "Apptainer image to run the stage in"}),
    ("--venv", {"metavar": "PATH", "help": "virtual environment (shared filesystem) to activate"}),
    ("--proxy", {"metavar": "FILE", "help": "GRID proxy (default: $X509_USER_PROXY)"}),
    ("--job-dir", {"metavar": "DIR", "help": "where job directories go (default: jobs/)"}),
    (
        "--transfer-inputs",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "HTCondor: ship local inputs with the job (no shared filesystem)",
        },
    ),
]


def add_parsers(sub: Any) -> None:
    """Add ``submit`` and ``jobs`` to the ``cmsml`` subcommands (``sub``, from add_subparsers)."""
    parser = sub.add_parser(
        "submit",
        help="run a stage as an HTCondor or SLURM batch job",
        description=(
            "Submit STAGE of CONFIG as a batch job that outlives this session: writes a job "
            "directory (submit file, wrapper script, worker config), submits it with "
            "condor_submit or sbatch, and prints the job id and where its log and outputs will "
            "be. Resources come from the config's `submit:` section, overridden by the flags."
        ),
    )
    parser.add_argument(
        "stage", metavar="STAGE", choices=SUBMIT_STAGES, help="|".join(SUBMIT_STAGES)
    )
    parser.add_argument("config", metavar="CONFIG", help="pipeline YAML")
    parser.add_argument(
        "--scheduler", choices=("htcondor", "slurm"), help="default: submit.scheduler (htcondor)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="write the job directory without submitting"
    )
    for flag, options in _FLAGS:
        parser.add_argument(flag, **options)
    listing = sub.add_parser(
        "jobs",
        help="list submitted batch jobs and their outputs",
        description=(
            "List the jobs submitted with `cmsml submit`, newest first, with their state "
            "(from squeue/sacct or condor_q/condor_history when available) and, for finished "
            "jobs, the outputs found where they should be (the bundle, the HDF5 files)."
        ),
    )
    listing.add_argument("--limit", type=int, default=20, help="show at most N jobs (default: 20)")


def run_command(args: argparse.Namespace) -> int:
    """Run ``cmsml submit`` or ``cmsml jobs`` from parsed arguments; returns the exit status."""
    if args.command == "jobs":
        print(format_jobs(jobs(limit=args.limit)))
        return 0
    resources = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _ in _FLAGS
    }
    job = submit(
        args.stage, args.config, scheduler=args.scheduler, dry_run=args.dry_run, **resources
    )
    if job.dry_run:
        print(f"wrote {job.name} (not submitted): {job.submit_file}")
        print(f"  submit it with: {job.submit_command}")
    else:
        print(f"submitted {job.stage} as {job.scheduler} job {job.job_id} ({job.name})")
    print(f"  job directory: {job.job_dir}")
    print(f"  log:           {job.log}")
    for output in job.outputs:
        print(f"  output:        {output}")
    print("  follow it with `cmsml jobs`")
    return 0
