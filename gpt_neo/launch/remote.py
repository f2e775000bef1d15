"""What the pod launcher runs on the workers, as shell scripts for `gcloud ... ssh`: unpack the
code and set up once per disk, clean up before an attempt, stop a run, and the script of an
attempt itself.

An attempt's script never `exec`s main.py: a shell waits for it and reports a death by signal N
as exit 128+N. ssh's own 255 then means only "connection lost", which matters because `gcloud
... ssh` runs a command again on that worker when ssh exits 255. The script also refuses to start
an attempt a second time on a worker, so gcloud's rerun cannot start a second copy of a run that
lost its connection but still runs.
"""

from __future__ import annotations

import shlex
import signal

from gpt_neo.launch.bundle import Bundle

REMOTE_DIR = "$HOME/gpt-neo"  # on every worker: code versions, the venv, the run's pid
PID_FILE = f"{REMOTE_DIR}/run.pid"
ATTEMPTS_DIR = f"{REMOTE_DIR}/attempts"  # one folder per attempt started on this worker
# The worker's shell found this attempt already started there: gcloud ran the command again
# after ssh lost its connection, and the first copy may still run.
RERUN_REFUSED = 254
SIGNALLED = 128  # a shell's status for a child killed by signal N is 128+N

# Kill the previous attempt's run process (by the pid it recorded, never by name) and remove
# libtpu's lock file, which a killed process leaves behind and which makes the next one fail
# with "TPU in use".
CLEAN_SCRIPT = (
    f'if [ -f "{PID_FILE}" ]; then p=$(cat "{PID_FILE}"); '
    'if kill -0 "$p" 2>/dev/null; then kill -KILL "$p"; '
    'echo "killed the previous run process $p"; fi; '
    f'rm -f "{PID_FILE}"; fi; rm -rf "{ATTEMPTS_DIR}"; '
    "if [ -e /dev/accel0 ] || [ -d /dev/vfio ]; then "
    "sudo -n rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile; fi"
)
# SIGTERM to the run process: it agrees on a step with the others, saves it and exits 75.
STOP_SCRIPT = f'[ -f "{PID_FILE}" ] && kill -TERM "$(cat "{PID_FILE}")" 2>/dev/null; true'


def unpack_script(bundle: Bundle, setup: str | None) -> str:
    """Unpack the shipped tarball into its code folder; run `setup` there once per disk."""
    code_dir = f"{REMOTE_DIR}/{bundle.digest}"
    marker = f"{REMOTE_DIR}/setup-{bundle.setup_digest}.done"
    once = ""
    if setup:
        once = (
            f'if [ ! -e "{marker}" ]; then echo {shlex.quote("setup: " + setup)}; '
            f'({setup}) && touch "{marker}"; fi'
        )
    return (
        f'set -e; mkdir -p "{code_dir}"; tar xzf "$HOME/{bundle.name}" -C "{code_dir}"; '
        f'rm -f "$HOME/{bundle.name}"; cd "{code_dir}"; {once}'
    )


def run_script(
    bundle: Bundle, args: list[str], env: dict[str, str], attempt_id: str, attempt: int
) -> str:
    """One attempt on one worker: main.py with `args` and `env`, its pid recorded, its status
    (128+N for a death by signal N) the script's."""
    env = {"PYTHONUNBUFFERED": "1", **env}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    started = f"{ATTEMPTS_DIR}/{attempt_id}"
    refused = (
        f"attempt {attempt} was started on this worker already (gcloud reran the command "
        "after a lost connection); not starting it twice"
    )
    # No --tpu: a TPU VM's JAX picks its chips by itself (and the tests' CPU workers stay on
    # CPU); main.py prints the platform and device count it trains on. main.py runs in the
    # background so that this shell outlives it: it records main.py's pid for the launcher
    # (which signals and kills by it), passes a SIGTERM on, and exits with main.py's status,
    # 128+N for a death by signal N, where an exec'd main.py would make ssh say 255.
    return "\n".join(
        [
            f'cd "{REMOTE_DIR}/{bundle.digest}" || exit 1',
            f'mkdir -p "{ATTEMPTS_DIR}" || exit 1',
            f'if ! mkdir "{started}" 2>/dev/null; then echo {shlex.quote(refused)} >&2; '
            f"exit {RERUN_REFUSED}; fi",
            f'if [ -f "{REMOTE_DIR}/venv/bin/activate" ]; then '
            f'. "{REMOTE_DIR}/venv/bin/activate"; fi',
            f"env {assignments} python3 main.py --model {bundle.config_path} {shlex.join(args)} &",
            "pid=$!",
            f'echo "$pid" > "{PID_FILE}"',
            "trap 'kill -TERM \"$pid\" 2>/dev/null' TERM INT HUP",
            # a trapped signal interrupts `wait`: wait again until main.py has ended
            'while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done',
            'exit "$code"',
        ]
    )


def exit_meaning(code: int) -> str:
    """What a worker's exit status says, for the launcher's log line."""
    if SIGNALLED < code < SIGNALLED + 65:
        number = code - SIGNALLED
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = " (the out-of-memory killer, or kill -9)" if number == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited {code}"
