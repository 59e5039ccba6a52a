"""The workflow on a real one-node SLURM cluster started by the test (slurmctld + slurmd + munged).

Debian's slurm (22.05) and munge are installed with apt when missing (root only; the test is skipped
with the reason when that is impossible). The cluster has no cgroups and no accounting database, a
CPU partition and a GPU partition whose node carries two fake GPUs (character devices, as SLURM only
stats them). The workflow runs with a profile derived from profiles/slurm: the site lines (partitions,
account) are overridden, the status command is squeue (there is no sacct). What is checked:

* every job of the ingest and scoring shards of a tiny cohort (a randomly initialised encoder saved
  with the package's checkpoint code) went through sbatch (one submission per job, read from the
  plugin's --verbose "sbatch call:" lines) with partition, memory and wall time, and finished:
  slurmctld logged exit status 0 for each SLURM job id and the tables are complete;
* the GPU rule score_shard, with the shipped profile's set-resources, is submitted as
  `sbatch -p gpu --gpus=<model>:1`, which this cluster accepts; the job sees the GPU SLURM bound to it;
* a new site's rerun, with the GPU rules mapped to the CPU partition, submits only that site's
  shards (score_shard now without GPU options) and the gather;
* opt-in (AQ_SLURM_DEMO=1, ~18 min on 2 cores, not in CI): the whole demo workflow (`make demo`'s
  52 jobs besides `all`, from the generated cohort to the report) through sbatch, every job exiting 0.

The daemons are stopped by PID in a finalizer; every subprocess has a timeout.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from ..conftest import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = ("train_encoder", "score_shard")
APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
RUN_TIMEOUT = 420  # seconds for one snakemake run on the cluster

pytestmark = pytest.mark.slow



def write_sheet(workdir: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(workdir / "sheet.tsv", sep="\t", index=False)


def make_volume(path: Path, seed: int) -> Path:
    """A small random NIfTI volume (16 x 18 x 12, 1 x 1 x 1.5 mm)."""
    data = np.random.default_rng(seed).normal(100, 20, size=(16, 18, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.5, 1.0])), str(path))
    return path


# --------------------------------------------------------------------------------------------
# Installing and starting the cluster
# --------------------------------------------------------------------------------------------


def _run(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_slurm_installed() -> None:
    """Install slurm and munge with apt if a binary is missing; skip the test when that fails."""
    needed = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in needed):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and cannot be: apt-get needs root (install " + " ".join(APT_PACKAGES) + ")")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        up = _run(["apt-get", "update"], timeout=300, env=env)
        inst = _run(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES], timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("installing SLURM with apt-get timed out")
    if inst.returncode != 0:
        pytest.skip(f"apt-get could not install SLURM (update exit {up.returncode}): {inst.stderr.strip()[-500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_memory_mb() -> int:
    """Memory SLURM may give jobs: the node's RealMemory from `slurmd -C`, less a margin."""
    out = _run(["slurmd", "-C"], timeout=30).stdout
    m = re.search(r"RealMemory=(\d+)", out)
    return max(1000, int(int(m.group(1)) * 0.9)) if m else 2000


class Cluster:
    """A one-node SLURM cluster in a temporary folder; `env` points the SLURM commands at it."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.cpus = os.cpu_count() or 1
        self.mem_mb = node_memory_mb()
        self.gpu_model = "fakegpu"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]  # never inherit an outer job's context

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        # two fake GPUs (SLURM only stats the device files), so that two scoring shards run side by side
        for k in range(2):
            res = _run(["mknod", str(r / f"fakegpu{k}"), "c", "195", str(k)], timeout=10)
            if res.returncode != 0:
                pytest.skip(f"cannot create the fake GPU device here (mknod: {res.stderr.strip()})")
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = r / "munge" / "munge.socket"
        # snakemake-executor-plugin-slurm-jobstep drops SLURM_CONF from the environment of the srun it
        # runs inside each job, so srun would look for /etc/slurm/slurm.conf: a wrapper puts it back.
        # (A real cluster keeps its slurm.conf where the tools look by default.)
        bindir = r / "bin"
        bindir.mkdir(exist_ok=True)
        srun = bindir / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.conf))} exec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)
        self.env["PATH"] = f"{bindir}{os.pathsep}{self.env.get('PATH', '')}"
        self.conf.write_text(
            f"""ClusterName=aqtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CryptoType=crypto/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName=aqnode NodeHostname={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} Gres=gpu:{self.gpu_model}:2 State=UNKNOWN
PartitionName=cpu Nodes=aqnode Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=aqnode MaxTime=INFINITE State=UP
"""
        )
        (r / "gres.conf").write_text(f"NodeName=aqnode Name=gpu Type={self.gpu_model} File={r}/fakegpu[0-1]\n")

    def start(self) -> None:
        self.write_config()
        r = self.root
        self._spawn(
            "munged",
            ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={r}/munge/munge.key",
             f"--log-file={r}/munged.log", f"--pid-file={r}/munge/munged.pid", f"--seed-file={r}/munge/seed"],
        )
        self._wait(lambda: self.munge_socket.exists(), "munged socket", 20)
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: _run(["scontrol", "ping"], 10, env=self.env).stdout.count("UP") > 0, "slurmctld", 60)
        self._spawn("slurmd", ["slurmd", "-D", "-N", "aqnode", "-f", str(self.conf)])
        self._wait(self._node_idle, "node aqnode idle", 90)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _node_idle(self) -> bool:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], 10, env=self.env).stdout
        return "aqnode idle" in out

    def _wait(self, ok, what: str, seconds: float) -> None:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}:\n{self.logs()}")
            try:
                if ok():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    def completed_jobs(self) -> dict[str, int]:
        """{slurm job id: exit status} from slurmctld's log ('_job_complete: JobId=N WEXITSTATUS s')."""
        text = (self.root / "slurmctld.log").read_text(errors="replace")
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"_job_complete: JobId=(\d+) WEXITSTATUS (\d+)", text)}

    def stop(self) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld and munged by their PIDs."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                _run(["scancel", "-u", "root"], 15, env=self.env)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    if sys.platform != "linux":
        pytest.skip("the SLURM integration test needs Linux")
    ensure_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged in a test needs root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(c.stop)
    c.start()
    return c


# --------------------------------------------------------------------------------------------
# Profiles and runs
# --------------------------------------------------------------------------------------------


def shipped_profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def derived_profile(dest: Path, cluster: Cluster, gpu_partition: bool, logdir: Path) -> Path:
    """profiles/slurm adapted to the test cluster, the way README tells a user to adapt it."""
    prof = copy.deepcopy(shipped_profile())
    prof["slurm-status-command"] = "squeue"  # no accounting database: sacct would never answer
    prof["slurm-init-seconds-before-status-checks"] = 3
    prof["slurm-keep-successful-logs"] = True
    prof["slurm-logdir"] = str(logdir)
    prof["latency-wait"] = 5
    prof["retries"] = 0
    prof["default-resources"].pop("slurm_account", None)
    prof["default-resources"]["slurm_partition"] = "cpu"
    prof["default-resources"]["mem_mb"] = "500 * attempt"
    # the ingest rule asks for config ingest.mem_mb (8 GB); this small node may not have that
    prof.setdefault("set-resources", {})["ingest_shard"] = {"mem_mb": 1000}
    # one CPU per shard job, so that two shards run side by side on a 2-CPU node
    prof["set-threads"] = {"ingest_shard": 1, "score_shard": 1}
    for rule in GPU_RULES:
        res = prof["set-resources"][rule]
        if gpu_partition:
            res["gpu_model"] = cluster.gpu_model
            res["mem_mb"] = 1000
        else:  # GPU rules mapped to CPU
            res.update(slurm_partition="cpu", gpu=0, mem_mb=1000)
            res.pop("gpu_model", None)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dest


def run_on_cluster(cluster: Cluster, workdir: Path, profile: Path, *args: str, snakefile: Path | None = None,
                   timeout: float = RUN_TIMEOUT):
    cmd = [str(SNAKEMAKE), "-s", str(snakefile or REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", str(profile), "--verbose", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster.env,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        raise AssertionError(f"snakemake on SLURM did not finish in {timeout} s:\n{out[-5000:]}\n{cluster.logs()}")
    if p.returncode != 0:
        raise AssertionError(f"snakemake on SLURM failed ({p.returncode}):\n{out[-8000:]}\n{cluster.logs()}")
    return out


def sbatch_calls(out: str) -> tuple[list[dict], list[str]]:
    """The plugin's submissions: rule, wildcards, sbatch options (before --wrap) and, in the same
    order, their SLURM job ids. The plugin submits from several threads, so its "sbatch call" and
    "submitted" lines can interleave: a call is paired with its id through the log path
    (`--output <dir>/%j.log` in the call, the same path with the id in the "submitted" line)."""
    calls = []
    for line in out.splitlines():
        if "sbatch call: " not in line:
            continue
        cmd = line.split("sbatch call: ", 1)[1].split(" --wrap=", 1)[0]
        argv = shlex.split(cmd)
        comment = argv[argv.index("--comment") + 1]
        rule, _, wildcards = comment.removeprefix("rule_").partition("_wildcards_")
        calls.append(dict(rule=rule, wildcards=wildcards, argv=argv))
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.?$", out, re.M)
    assert len(submitted) == len(calls), f"{len(calls)} sbatch calls but {len(submitted)} submissions:\n{out[-4000:]}"
    by_log = {}
    for jobid, log in submitted:
        by_log.setdefault(str(Path(log).with_name("%j.log")), []).append(jobid)
    ids = [by_log[str(Path(opt(c["argv"], "--output")))].pop(0) for c in calls]
    return calls, ids


def opt(argv: list[str], name: str) -> str | None:
    """Value of an sbatch option given as '-p x', '--mem x' or '--gpus=x'."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def make_cohort(workdir: Path) -> list[dict]:
    rows = []
    for site in ("A", "B"):
        for i in range(2):
            p = make_volume(workdir / f"{site}{i}.nii.gz", seed=10 * ord(site) + i)
            rows.append(dict(volume_id=f"{site}-{i}", site=site, subject=f"{site}{i}", contrast="T1w", path=str(p)))
    write_sheet(workdir, rows)
    return rows


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_shipped_profile_names_gpu_rules_with_standard_resources():
    prof = shipped_profile()
    assert prof["executor"] == "slurm"
    assert prof["retries"] >= 1 and "attempt" in str(prof["default-resources"]["mem_mb"])
    text = PROFILE.read_text()
    assert "slurm_extra" not in re.sub(r"#.*", "", text) and "gres" not in re.sub(r"#.*", "", text)
    for rule in GPU_RULES:
        res = prof["set-resources"][rule]
        assert res["gpu"] >= 1 and res["slurm_partition"] == "gpu", rule
    # every setting line carries a comment (on it or right above it)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"uncommented profile line: {line!r}"


def test_profile_gpu_settings_reach_the_workflows_gpu_rules(tmp_path):
    """No cluster needed: the rule names in set-resources exist, and a dry-run of the demo DAG with the
    shipped profile gives its GPU jobs gpu=1 on the GPU partition (a renamed rule would silently lose it). The
    demo with its training stage (demo_train.yaml), so that train_encoder is in the DAG."""
    base = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(REPO / "config" / "config.yaml"), str(REPO / "config" / "demo.yaml"),
            str(REPO / "config" / "demo_train.yaml")]
    rules = set(_run([*base, "--list-rules"], timeout=300).stdout.split())
    assert set(shipped_profile()["set-resources"]) <= rules, sorted(rules)
    res = _run([*base, "--profile", str(PROFILE.parent), "-n"], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    seen = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", res.stdout + res.stderr):
        m = re.match(r"(?:local)?rule (\w+):", block)
        r = re.search(r"resources: (.*)", block)
        if m and r:
            seen.setdefault(m.group(1), set()).add(("gpu=1" in r.group(1)) and ("slurm_partition=gpu" in r.group(1)))
    gpu_rules_in_dag = [r for r in GPU_RULES if r in seen]
    assert {"train_encoder", "score_shard"} <= set(gpu_rules_in_dag), sorted(seen)
    assert all(seen[r] == {True} for r in gpu_rules_in_dag), seen
    assert not any(True in v for r, v in seen.items() if r not in GPU_RULES), seen


def make_model(dest: Path) -> Path:
    return save_tiny_model(dest, meta={"model_id": "slurm-test"})


def submitted(calls) -> list[tuple[str, str]]:
    return sorted((c["rule"], c["wildcards"]) for c in calls)


def test_workflow_through_sbatch_gpu_options_and_new_site_submits_only_its_jobs(cluster, tmp_path):
    """Ingest + scoring shards of a tiny cohort on SLURM; scoring is the real GPU rule score_shard."""
    workdir = tmp_path / "wd"
    workdir.mkdir()
    rows = make_cohort(workdir)
    (workdir / "test.yaml").write_text(yaml.safe_dump({
        "cohort": {"sheet": str(workdir / "sheet.tsv")},
        "model": {"id": "slurm-test", "pretrained": str(make_model(tmp_path / "model"))},
        "score": {"threads": 1},
    }))
    config = ["--configfile", str(REPO / "config" / "config.yaml"), str(workdir / "test.yaml")]

    def targets(sites):
        return ["results/cohort/volumes.parquet", "results/cohort/failures.parquet",
                *[f"results/scores/raw/site={s}/part-0.parquet" for s in sites]]

    # 1) a site with GPUs: the shipped profile's score_shard settings plus the GPU model of this cluster
    gpu_site = derived_profile(tmp_path / "gpu_profile", cluster, gpu_partition=True, logdir=tmp_path / "slurm_logs")
    out = run_on_cluster(cluster, workdir, gpu_site, *targets("AB"), *config)
    calls, ids = sbatch_calls(out)
    assert submitted(calls) == [("ingest", ""), ("ingest_shard", "A_0"), ("ingest_shard", "B_0"),
                                ("score_shard", "A_0"), ("score_shard", "B_0")]
    for c, jobid in zip(calls, ids):
        argv, on_gpu = c["argv"], c["rule"] == "score_shard"
        assert opt(argv, "-t") is not None and opt(argv, "--mem") is not None, argv
        assert opt(argv, "--gres") is None, argv
        if on_gpu:  # -p gpu --gpus=fakegpu:1 --ntasks-per-gpu=1
            assert (opt(argv, "-p"), opt(argv, "--gpus"), opt(argv, "--ntasks-per-gpu")) == (
                "gpu", f"{cluster.gpu_model}:1", "1"), argv
            show = _run(["scontrol", "-o", "show", "job", jobid], 15, env=cluster.env).stdout
            assert "Partition=gpu" in show and f"TresPerJob=gres:gpu:{cluster.gpu_model}:1" in show, show
            # the batch step saw the GPU SLURM bound to it (the plugin's job step logs its environment)
            log = next((tmp_path / "slurm_logs" / "rule_score_shard" / c["wildcards"]).glob(f"{jobid}.log"))
            assert re.search(r"'CUDA_VISIBLE_DEVICES': '[01]'", log.read_text(errors="replace")), log
        else:
            assert (opt(argv, "-p"), opt(argv, "--gpus")) == ("cpu", None), argv
    done = cluster.completed_jobs()
    assert {i: done.get(i) for i in ids} == {i: 0 for i in ids}, cluster.logs()
    vols = pd.read_parquet(workdir / "results/cohort/volumes.parquet")
    assert sorted(vols["volume_id"]) == sorted(r["volume_id"] for r in rows)
    for site in "AB":
        scored = pd.read_parquet(workdir / f"results/scores/raw/site={site}/part-0.parquet")
        assert sorted(scored["volume_id"]) == [f"{site}-0", f"{site}-1"] and (scored["status"] == "ok").all()

    # 2) a new site delivers, and this time the GPU rules are mapped to the CPU partition: only the new
    #    site's shards and the cohort gather go to SLURM, and score_shard carries no GPU option
    p = make_volume(workdir / "C0.nii.gz", seed=99)
    rows.append(dict(volume_id="C-0", site="C", subject="C0", contrast="T1w", path=str(p)))
    write_sheet(workdir, rows)
    cpu_only = derived_profile(tmp_path / "cpu_profile", cluster, gpu_partition=False, logdir=tmp_path / "slurm_logs")
    out = run_on_cluster(cluster, workdir, cpu_only, *targets("ABC"), *config)
    calls, ids = sbatch_calls(out)
    assert submitted(calls) == [("ingest", ""), ("ingest_shard", "C_0"), ("score_shard", "C_0")]
    for c in calls:
        assert (opt(c["argv"], "-p"), opt(c["argv"], "--gpus"), opt(c["argv"], "--gres")) == ("cpu", None, None)
    done = cluster.completed_jobs()
    assert {i: done.get(i) for i in ids} == {i: 0 for i in ids}, cluster.logs()
    assert "C-0" in set(pd.read_parquet(workdir / "results/cohort/volumes.parquet")["volume_id"])
    assert list(pd.read_parquet(workdir / "results/scores/raw/site=C/part-0.parquet")["volume_id"]) == ["C-0"]


@pytest.mark.skipif(
    os.environ.get("AQ_SLURM_DEMO") != "1",
    reason="the whole demo workflow on the test cluster takes ~20 min on 2 cores: set AQ_SLURM_DEMO=1 to run it",
)
def test_whole_demo_workflow_through_sbatch(cluster, tmp_path):
    """`make demo-train` under a profile derived from profiles/slurm (GPU rules mapped to the CPU partition):
    every job the dry-run plans is submitted with sbatch once and exits 0 in SLURM, and the run ends with
    the cohort table and the report files."""
    workdir = tmp_path / "demo"
    workdir.mkdir()
    # with its training stage (demo_train.yaml: a fine-tune of the builtin model), so that every rule runs
    config = ["--configfile", str(REPO / "config" / "config.yaml"), str(REPO / "config" / "demo.yaml"),
              str(REPO / "config" / "demo_train.yaml")]
    dry = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "-n",
                          "--cores", "2", *config], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    planned = sorted(re.findall(r"^rule (\w+):", dry.stdout + dry.stderr, flags=re.M))
    assert {"train_encoder", "score_shard", "fit_flow", "report_figures"} <= set(planned), planned

    profile = derived_profile(tmp_path / "cpu_profile", cluster, gpu_partition=False, logdir=tmp_path / "logs")
    out = run_on_cluster(cluster, workdir, profile, *config, timeout=3600)
    calls, ids = sbatch_calls(out)
    jobs = [(c["rule"], c["wildcards"]) for c in calls]
    assert len(set(jobs)) == len(jobs), jobs  # no job submitted twice
    # every rule the dry-run plans, but the target rule `all` (which runs nothing), went through sbatch; the
    # dry-run cannot list the jobs decided by the training_selection checkpoint (n4 and superres per volume)
    assert set(planned) - {"all"} <= {rule for rule, _ in jobs}, sorted(jobs)
    assert {"n4", "superres"} <= {rule for rule, _ in jobs}, sorted(jobs)
    for c in calls:
        assert opt(c["argv"], "-p") == "cpu" and opt(c["argv"], "--gpus") is None, c["argv"]
    done = cluster.completed_jobs()
    assert {i: done.get(i) for i in ids} == {i: 0 for i in ids}, cluster.logs()
    scores = pd.read_parquet(workdir / "results" / "scores" / "cohort.parquet")
    assert (scores["status"] == "ok").sum() >= 20, scores[["volume_id", "status"]]
    assert (workdir / "results" / "report" / "mriqc_comparison.md").is_file()
