"""A stand-in for Slurm's `sbatch`, `squeue` and `scancel` on this machine.

`install(bin_dir, state_dir)` writes three executables. `sbatch --parsable SCRIPT` reads
the script's `#SBATCH --array=A-B` and `--output=` lines, starts one detached process that
runs the array tasks one after another (`bash SCRIPT` with `SLURM_ARRAY_TASK_ID`,
`SLURM_ARRAY_JOB_ID` and `SLURM_CPUS_PER_TASK` set, output to the `%A_%a` log), and prints
the job id. `squeue --jobs ID` prints the id while that process lives; `scancel ID` kills
it. Every call is appended to `state_dir/calls.log`; `FAKE_SBATCH_ERROR` makes sbatch fail
with that message, as Slurm does for a bad partition; `FAKE_SQUEUE_FAILURES=N` makes the first
N squeue calls time out, as a busy controller does.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

_SBATCH = r"""
import os, re, shlex, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_STATE"])
with open(state / "calls.log", "a") as log:
    log.write("sbatch " + " ".join(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_SBATCH_ERROR"):
    sys.stderr.write("sbatch: error: " + os.environ["FAKE_SBATCH_ERROR"] + "\n")
    sys.exit(1)
script = sys.argv[-1]
opts = dict(re.findall(r"^#SBATCH --([a-z-]+)=(.*)$", Path(script).read_text(), re.M))
opts = {k: (shlex.split(v) or [""])[0] for k, v in opts.items()}  # quotes as sbatch reads them
first, last = opts["array"].split("%")[0].split("-")
counter = state / "next_id"
job = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(job + 1))
runner = (
    "import os, subprocess, sys\n"
    "for i in range(%d, %d):\n"
    "    out = %r.replace('%%A', '%d').replace('%%a', str(i))\n"
    "    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_JOB_ID='%d',\n"
    "               SLURM_CPUS_PER_TASK=%r)\n"
    "    with open(out, 'w') as fh:\n"
    "        subprocess.run(['bash', %r], env=env, stdout=fh, stderr=subprocess.STDOUT)\n"
) % (int(first), int(last) + 1, opts["output"], job, job, opts.get("cpus-per-task", "1"), script)
proc = subprocess.Popen([sys.executable, "-c", runner], start_new_session=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
(state / f"{job}.pid").write_text(str(proc.pid))
print(f"{job};fakecluster")
"""

_SQUEUE = r"""
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_STATE"])
fails = state / "squeue_failures"  # FAKE_SQUEUE_FAILURES: time out that many calls first
done = int(fails.read_text()) if fails.exists() else 0
if done < int(os.environ.get("FAKE_SQUEUE_FAILURES", "0")):
    fails.write_text(str(done + 1))
    sys.stderr.write("slurm_load_jobs error: Socket timed out on send/recv operation\n")
    sys.exit(1)
job = sys.argv[sys.argv.index("--jobs") + 1]
pid_file = state / f"{job}.pid"
if not pid_file.exists():
    sys.stderr.write("slurm_load_jobs error: Invalid job id specified\n")
    sys.exit(1)
pid = int(pid_file.read_text())
try:
    os.waitpid(pid, os.WNOHANG)  # not our child: ignore
except ChildProcessError:
    pass
try:
    with open(f"/proc/{pid}/stat") as fh:
        alive = fh.read().split()[2] != "Z"
except FileNotFoundError:
    alive = False
if alive:
    print(job)
"""

_SCANCEL = r"""
import os, signal, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_STATE"])
with open(state / "calls.log", "a") as log:
    log.write("scancel " + " ".join(sys.argv[1:]) + "\n")
pid_file = state / f"{sys.argv[1]}.pid"
if pid_file.exists():
    try:
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def install(bin_dir: Path, state_dir: Path) -> None:
    """Write the three commands into `bin_dir`; they keep their state in `state_dir`, which
    the caller exports as `FAKE_SLURM_STATE` (and `bin_dir` first on the `PATH`)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", _SBATCH), ("squeue", _SQUEUE), ("scancel", _SCANCEL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def calls(state_dir: Path) -> list[str]:
    log = state_dir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []
