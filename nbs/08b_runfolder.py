# %%
#| default_exp runfolder

# %%
#| export
from __future__ import annotations
import hashlib, json, os, signal, socket, sys, threading, time, uuid
from dataclasses import asdict
from pathlib import Path
from fastcore.basics import patch
from jigsaw_ref.settings import TrainConfig, parse_signals

# %%
#| hide
import subprocess, tempfile
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc
work = Path(tempfile.mkdtemp(prefix="jigsaw-runfolder-"))


# %% [markdown]
# # The run folder
#
# > One run per folder (`run.lock`), stop signals agreed at a step boundary, and the run's lineage: what `--resume auto` continues.

# %% [markdown]
# ## Stopping when asked
#
# A scheduler ends a job with a signal: SLURM sends SIGTERM at a time limit, a preemption or `scancel` (and
# SIGKILL 30 s later, `KillWait`), SIGUSR1 or another signal of your choice some time before the limit with
# `--signal`; a terminal sends SIGINT. `Stopper` catches the signals of `--stop-signals` on every rank and only
# notes them: the ranks agree at the next step boundary (one small all-reduce that the time limit already uses),
# write a checkpoint, write the metrics, and exit with `--requeue-exit-code` (0 by default). A second signal
# aborts at once (the previous handler runs: for SIGTERM the process ends, for SIGINT in a notebook it is a
# `KeyboardInterrupt`); a checkpoint cut short by it is never committed, so the previous one stays intact.
# Handlers belong to the process, so they are installed only on the main thread (thread ranks in tests call
# `request`), for the time the trainer runs.

# %%
#| export
class Stopper:
    "Catches stop signals on this rank: the first asks for a stop at the next step boundary, a second aborts at once."
    def __init__(self, signals: str = "TERM,INT,USR1",  # the signals to catch ('': none)
                 rank: int | None = None):  # for the messages (default: from the launcher's environment)
        self.signals, self.signal, self._prev = parse_signals(signals), None, {}
        env_rank = next((os.environ[k] for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "RANK") if k in os.environ), "0")
        self.rank = int(env_rank) if rank is None else rank

    def request(self, name: str):
        "Ask for a stop, as the signal `name` does (thread ranks and tests)."
        self.signal = self.signal or name


# %%
#| export
@patch
def install(self: Stopper) -> bool:
    "Install the handlers (main thread only, once); whether this call installed them."
    if self._prev or not self.signals or threading.current_thread() is not threading.main_thread(): return False
    self._prev = {s: signal.signal(s, self._handle) for s in self.signals}
    return True


@patch
def uninstall(self: Stopper):
    "Put back the handlers that were there before `install`."
    for s, h in self._prev.items(): signal.signal(s, h)
    self._prev = {}


# %%
#| export
@patch
def _handle(self: Stopper, signum, frame):
    name = signal.Signals(signum).name
    if self.signal is None:
        self.signal = name
        sys.stderr.write(f"[jigsaw_ref rank {self.rank}] {name}: stopping at the next step boundary (checkpoint, metrics, "
                         f"then exit); send it again to abort at once\n"); sys.stderr.flush()
        return
    sys.stderr.write(f"[jigsaw_ref rank {self.rank}] {name} again: aborting now, without a checkpoint (the last one is intact)\n")
    sys.stderr.flush()
    prev = self._prev.get(signum, signal.SIG_DFL)
    self.uninstall()
    if callable(prev): return prev(signum, frame)  # e.g. Python's SIGINT handler: KeyboardInterrupt
    if prev == signal.SIG_DFL: signal.raise_signal(signum)  # the default action: the process ends by this signal
    os._exit(128 + signum)  # the signal was ignored before: end anyway


# %%
show_doc(Stopper)

# %% [markdown]
# In this process (the notebook's main thread): the first SIGUSR1 only notes the stop; a second one runs the
# handler that was there before, here a stand-in that records it.

# %%
_seen = []
signal.signal(signal.SIGUSR1, lambda s, f: _seen.append("previous handler"))
_st = Stopper("USR1", rank=0)
assert _st.install()
os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.05)
test_eq((_st.signal, _seen), ("SIGUSR1", []))
os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.05)
test_eq(_seen, ["previous handler"])
assert not _st._prev  # the second signal uninstalled it
signal.signal(signal.SIGUSR1, signal.SIG_DFL)


# %% [markdown]
# ## One run per folder
#
# A run folder belongs to one run. At start, rank 0 claims it with `run.lock`, created exclusively: the run id,
# the host, the process id, the start time, a hash of the settings and the scheduler's job id. The lock is
# checked (and its time stamp refreshed) before every write, so a run whose folder was taken over stops instead
# of writing into someone else's run. A lock is *stale*, and taken over with a note, when its process is gone
# (same host), when it belongs to an earlier run of the same scheduler job (a requeue, possibly on another
# node), or when it was not refreshed for `STALE_S` (another host, where the process cannot be checked).
# Otherwise a second job on the folder is refused, naming the job that holds it. The lock is removed when the
# run ends, stops or fails; a rank killed outright (by its job's abort, or `kill -9`) leaves it, stale.
#
# The *run id* names the logical run: a fresh run draws one, a resumed run takes its checkpoint's, so a run
# requeued ten times is one run. Checkpoints and `summary.json` carry it. A new run (not resuming) into a
# folder that holds another run's checkpoints is refused with the fixes: `--resume auto` to continue it,
# another `--out`, or `--overwrite` to delete them.

# %%
#| export
class RunFolderError(ValueError):
    "A run folder that this run cannot write: held by another job, holding another run, or not writable."


LOCK_NAME = "run.lock"
STALE_S = 3600.0  # a lock from another host not refreshed for this long (or twice the step timeout) is stale


# %%
#| export
def settings_hash(tc: TrainConfig) -> str:
    "A short hash of the settings that define the run (not where it writes, how it resumes or what it prints)."
    skip = {"out", "resume", "overwrite", "progress", "reschedule", "stop_signals", "requeue_exit_code", "step_timeout"}
    return hashlib.sha256(json.dumps({k: v for k, v in asdict(tc).items() if k not in skip}, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _job_id() -> str | None:
    "The scheduler's job id of this process, if there is one."
    for k in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID"):
        if os.environ.get(k): return f"{k}={os.environ[k]}"
    return None


def lock_info(run_id: str, tc: TrainConfig) -> dict:
    "What `run.lock` says about this process's claim."
    st = _proc_stat(os.getpid())
    return dict(claim=uuid.uuid4().hex[:12], run_id=run_id, host=socket.gethostname(), pid=os.getpid(),
                pid_start=st[19] if st else None, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), settings=settings_hash(tc),
                job=_job_id())


# %%
#| export
def read_lock(folder) -> tuple[dict | None, float]:
    "The claim in `folder/run.lock` (None if there is none or it cannot be read) and its age in seconds."
    f = Path(folder) / LOCK_NAME
    try: age, text = time.time() - f.stat().st_mtime, f.read_text()
    except FileNotFoundError: return None, 0.0
    try: info = json.loads(text)
    except ValueError: info = {}
    return (info if isinstance(info, dict) else {}), age


def describe(info: dict | None) -> str:
    "The run of a lock or checkpoint, in words."
    if not info: return "an unknown run"
    return (f"run {info.get('run_id')} (host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
            + (f", {info['job']}" if info.get("job") else "") + f", settings {info.get('settings')})")


# %%
#| export
LOCK_GRACE_S = 1.0  # a lock holder of this host that may be in the first moments of being killed gets this long to go


def _proc_stat(pid) -> list[str] | None:
    "The fields of /proc/PID/stat after the command name (state first, start time at index 19); None where there are none."
    try: return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError): return None


def _alive(pid, start: str | None = None, grace: float = LOCK_GRACE_S) -> bool:
    "Whether process `pid` (started at `start`, clock ticks since boot) runs: a zombie, a reused pid, one that is exiting or exits within `grace` s does not."
    t_end = time.monotonic() + grace
    while True:
        try: os.kill(int(pid), 0)
        except ProcessLookupError: return False
        except (TypeError, ValueError): return True  # not a pid we can judge: assume the holder lives
        except PermissionError: pass
        st = _proc_stat(pid)
        if st is None: return True  # no /proc: kill 0 is all we know
        if st[0] in "ZXx": return False  # exited, not yet reaped (a crashed job's rank outlives mpiexec's return)
        if start is not None and st[19] != str(start): return False  # the pid now belongs to another process
        try:
            if not Path(f"/proc/{int(pid)}/cmdline").read_bytes(): return False  # its memory is released: it is exiting
        except OSError: return False
        if time.monotonic() >= t_end: return True
        time.sleep(0.05)  # a rank killed by its job's abort may not have started tearing down yet: look again


def stale_reason(other: dict, age: float, me: dict, stale_s: float = STALE_S, grace: float = LOCK_GRACE_S) -> str | None:
    "Why the claim `other` (refreshed `age` s ago) no longer holds against `me`, or None while it does."
    if other.get("claim") == me["claim"]: return "this run's own claim"
    if not other: return f"an unreadable lock, {age:.0f} s old" if age > 60 else None
    if other.get("host") == me["host"]:
        if other.get("pid") == me["pid"]: return "this process's own claim"  # a notebook or a test: a new trainer
        if not _alive(other.get("pid"), other.get("pid_start"), grace):
            return f"process {other.get('pid')} on {other.get('host')} is not running"
    if other.get("job") and other.get("job") == me["job"]: return f"an earlier run of the same job ({me['job']}: requeued)"
    if age > stale_s: return f"not refreshed for {age / 60:.0f} min"
    return None


# %%
#| export
def claim_folder(folder, me: dict, stale_s: float = STALE_S, grace: float = LOCK_GRACE_S) -> str | None:
    "Claim `folder` for the run `me` (`lock_info`): None if it was free, a note if a stale lock was taken over; else `RunFolderError`."
    folder, f = Path(folder), Path(folder) / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(f, "x") as fh: fh.write(json.dumps(me))
            return None
        except FileExistsError: pass
        other, age = read_lock(folder)
        why = stale_reason(other, age, me, stale_s, grace)
        if why is None:
            raise RunFolderError(f"{folder} is in use by {describe(other)}: two jobs must not write one run folder; wait for "
                                 f"it to end, choose another --out, or, if that job is gone, delete {f}")
        tmp = folder / f".{LOCK_NAME}.{me['claim']}"
        tmp.write_text(json.dumps(me)); os.replace(tmp, f)
    except OSError as e:
        raise RunFolderError(f"{folder}: cannot claim the run folder ({e.strerror}); choose a writable --out") from None
    if (read_lock(folder)[0] or {}).get("claim") != me["claim"]:  # another job took it over at the same moment
        raise RunFolderError(f"{folder} was claimed by {describe(read_lock(folder)[0])} at the same moment; choose another --out")
    return None if why.endswith("own claim") else f"took over {f} from {describe(other)}: {why}"


# %%
#| export
def check_claim(folder, me: dict):
    "Before a write: `folder` is still claimed by `me` (a lock found missing is claimed again); refresh its time stamp."
    other, _ = read_lock(folder)
    if other is None: claim_folder(folder, me); return
    if other.get("claim") != me["claim"]:
        raise RunFolderError(f"{folder} was taken over by {describe(other)} while {describe(me)} ran; this run stops here "
                             f"without writing (its last checkpoint is intact): two jobs must not share an --out")
    try: os.utime(Path(folder) / LOCK_NAME)
    except OSError: pass


def release_folder(folder, me: dict):
    "Remove `run.lock` if it is still `me`'s claim."
    if (read_lock(folder)[0] or {}).get("claim") == me["claim"]: (Path(folder) / LOCK_NAME).unlink(missing_ok=True)


# %% [markdown]
# Two claims on one folder from this process stand in for two jobs: the second is refused while the first's
# process is alive, and takes over once the lock names a process that is gone.

# %%
_tc = TrainConfig(model="tiny")
_a, _b = lock_info("run-a", _tc), lock_info("run-b", _tc)
test_eq(claim_folder(work / "claimed", _a), None)
_other = dict(_a, pid=os.getppid(), pid_start=_proc_stat(os.getppid())[19])  # a live process of this host that is not us
(work / "claimed" / LOCK_NAME).write_text(json.dumps(_other))
test_fail(lambda: claim_folder(work / "claimed", _b, grace=0.2), contains=f"is in use by run run-a (host {socket.gethostname()}, pid {os.getppid()}")
(work / "claimed" / LOCK_NAME).write_text(json.dumps(dict(_other, pid_start="1")))  # the same pid, another process: reused
assert claim_folder(work / "claimed", _b, grace=0.2).endswith("is not running")
(work / "claimed" / LOCK_NAME).write_text(json.dumps(dict(_a, pid=2**22 + 7)))  # a process that is not running
print(claim_folder(work / "claimed", _b))
check_claim(work / "claimed", _b)
test_fail(lambda: check_claim(work / "claimed", _a), contains="was taken over by run run-b")
release_folder(work / "claimed", _b); test_eq(read_lock(work / "claimed")[0], None)


# %% [markdown]
# A job that crashed leaves its lock behind, and its rank 0 may outlive `mpiexec`'s return for a moment: killed by
# the job's abort but not yet reaped (a zombie), or still being torn down. Liveness is judged by what the process
# is (`/proc/PID/stat`: its state, and its start time against the one the lock recorded, so a reused pid does not
# count), and a holder of this host gets `LOCK_GRACE_S` to finish dying; so a requeue launched the moment a crashed
# job returns takes the folder over. An exited child that nobody reaped yet stands in for the crashed rank:

# %%
_z = subprocess.Popen([sys.executable, "-c", "pass"])  # exits; not waited for: a zombie
for _ in range(300):
    if _proc_stat(_z.pid)[0] == "Z": break
    time.sleep(0.1)
test_eq(_proc_stat(_z.pid)[0], "Z")
(work / "claimed" / LOCK_NAME).write_text(json.dumps(dict(_a, pid=_z.pid, pid_start=_proc_stat(_z.pid)[19])))
test_eq(_alive(_z.pid, grace=0.2), False)
assert claim_folder(work / "claimed", _b).endswith("is not running")
_z.wait(); release_folder(work / "claimed", _b)

# %%
#| hide
import shutil; shutil.rmtree(work, ignore_errors=True)
