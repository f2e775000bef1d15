"""The `gcloud` calls the pod launcher makes, and what their answers mean.

Everything goes through the `gcloud` command line rather than a Python client of the TPU API:
it is what users already have installed and logged in (`gcloud auth login`), it handles ssh
keys and IAP for `tpu-vm ssh/scp`, and a fake `gcloud` first on PATH can stand in for it in
tests. Output is read as `--format=json`, never scraped from tables.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

from gpt_neo.errors import UserError


class LaunchError(UserError):
    """Bad launcher input (no gcloud, not logged in, unknown zone...): exit 2, nothing created."""


class GcloudError(RuntimeError):
    """A gcloud call failed; `transient` when retrying may help (capacity, quota, network)."""

    def __init__(self, args: list[str], code: int, stderr: str):
        self.code, self.stderr = code, stderr.strip()
        self.reason = self.stderr.splitlines()[-1] if self.stderr else f"exit code {code}"
        super().__init__(f"gcloud {' '.join(args[:4])}: {self.reason}")

    @property
    def not_found(self) -> bool:
        return "NOT_FOUND" in self.stderr or "was not found" in self.stderr

    @property
    def capacity(self) -> bool:
        signs = ("RESOURCE_EXHAUSTED", "no more capacity", "QUOTA", "quota", "UNAVAILABLE")
        return any(sign in self.stderr for sign in signs)


# A slice's states (the TPU API's Node.state and QueuedResource.state.state) by what the
# launcher does about them.
READY = "READY"
ACTIVE = "ACTIVE"  # a queued resource whose node exists
FAILED = "FAILED"  # a queued resource the TPU API could not grant (quota, bad request)
WAIT = {  # on the way to READY (a node or a queued resource), or to gone: poll again
    *("CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "UNHIDING"),
    *("ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES"),
    *("DELETING", "STOPPING", "SUSPENDING", "HIDING"),
}
# anything else (PREEMPTED, TERMINATED, STOPPED, SUSPENDED, HIDDEN, UNKNOWN) is lost: delete
# and recreate; a queued resource that is FAILED is the user's to look at


@dataclass(frozen=True)
class SliceSpec:
    """What the launcher creates: `--tpu NAME --zone Z --accelerator_type T ...`."""

    name: str
    zone: str
    project: str | None
    accelerator_type: str | None
    runtime_version: str
    provisioning: str  # "standard", "spot" or "preemptible"
    queued: bool
    num_slices: int = 1  # > 1: one queued resource of that many slices (multi-slice)

    @property
    def nodes(self) -> list[str]:
        """The TPU VMs' names: the slice's own, or for several slices the queued resource's
        nodes, which the TPU API names PREFIX-0, PREFIX-1, ... (`--node-prefix NAME`)."""
        if self.num_slices == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.num_slices)]


class Gcloud:
    """`gcloud compute tpus ...` for one zone and project."""

    def __init__(self, zone: str, project: str | None, executable: str = "gcloud"):
        self.zone, self.project, self.executable = zone, project, executable

    # --- plumbing --------------------------------------------------------------------------
    def command(self, *args: str) -> list[str]:
        scope = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
        return [self.executable, *args, *scope]

    def run(self, *args: str, timeout: float = 600) -> str:
        """stdout of `gcloud ARGS --zone --project`; a `GcloudError` when it fails."""
        return _run([*self.command(*args), "--quiet"], timeout)

    def json(self, *args: str):
        return json.loads(self.run(*args, "--format=json") or "null")

    # --- slices ----------------------------------------------------------------------------
    def describe_node(self, name: str) -> dict | None:
        """The TPU VM's Node (state, networkEndpoints, ...); None when it does not exist."""
        return self._describe("tpu-vm", name)

    def describe_queued(self, name: str) -> dict | None:
        """The queued resource (`state.state`); None when it does not exist."""
        return self._describe("queued-resources", name)

    def _describe(self, kind: str, name: str) -> dict | None:
        try:
            return self.json("compute", "tpus", kind, "describe", name)
        except GcloudError as err:
            if err.not_found:
                return None
            raise

    def create(self, spec: SliceSpec) -> None:
        provisioning = {"standard": [], "spot": ["--spot"], "preemptible": ["--preemptible"]}[
            spec.provisioning
        ]
        if spec.queued:
            if spec.provisioning == "preemptible":  # queued resources know spot, not preemptible
                provisioning = ["--spot"]
            if spec.num_slices > 1:  # its nodes are NAME-0 ... NAME-(N-1)
                nodes = [f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
            else:
                nodes = [f"--node-id={spec.name}"]
            self.run(
                "compute",
                "tpus",
                "queued-resources",
                "create",
                spec.name,
                *nodes,
                f"--accelerator-type={spec.accelerator_type}",
                f"--runtime-version={spec.runtime_version}",
                *provisioning,
            )
        else:
            self.run(
                "compute",
                "tpus",
                "tpu-vm",
                "create",
                spec.name,
                f"--accelerator-type={spec.accelerator_type}",
                f"--version={spec.runtime_version}",
                *provisioning,
            )

    def delete(self, name: str, queued: bool) -> None:
        """Delete the slice (a queued resource with --force, which also deletes its node and
        stops it holding quota); a slice already gone is fine."""
        try:
            if queued:
                self.run("compute", "tpus", "queued-resources", "delete", name, "--force")
            else:
                self.run("compute", "tpus", "tpu-vm", "delete", name)
        except GcloudError as err:
            if not err.not_found:
                raise

    # --- workers ---------------------------------------------------------------------------
    def ssh_command(self, name: str, worker: int | str, command: str) -> list[str]:
        return self.command(
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            name,
            f"--worker={worker}",
            f"--command={command}",
            "--strict-host-key-checking=no",
            "--quiet",
        )

    def ssh(self, name: str, worker: int | str, command: str, timeout: float = 1800) -> str:
        """Run `command` on `worker` ("all" for every worker) and wait; stdout, or a
        `GcloudError` (code 255: the connection was lost)."""
        return _run(self.ssh_command(name, worker, command), timeout)

    def scp(self, name: str, source: str, destination: str, timeout: float = 1800) -> None:
        _run(
            self.command(
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                source,
                f"{name}:{destination}",
                "--worker=all",
                "--strict-host-key-checking=no",
                "--quiet",
            ),
            timeout,
        )

    # --- before anything is created --------------------------------------------------------
    def accelerator_types(self) -> list[str]:
        """The accelerator types of the zone; a `LaunchError` for a zone that does not exist."""
        try:
            listed = self.json("compute", "tpus", "accelerator-types", "list")
        except GcloudError as err:
            raise LaunchError(
                f"--zone {self.zone}: gcloud cannot list TPU types there ({err.reason}); pick a "
                "zone with TPUs (gcloud compute tpus locations list)"
            ) from None
        return sorted(entry["type"] for entry in listed or [])


def find_gcloud() -> str:
    path = shutil.which("gcloud")
    if path is None:
        raise LaunchError(
            "the TPU launcher needs the gcloud CLI, and there is none on PATH: install the Google "
            "Cloud SDK (https://cloud.google.com/sdk/docs/install), then `gcloud auth login`"
        )
    return path


def active_account(executable: str) -> str:
    """The logged-in account; a `LaunchError` when there is none."""
    try:
        accounts = json.loads(_run([executable, "auth", "list", "--format=json"], 60) or "[]")
    except (GcloudError, json.JSONDecodeError) as err:
        raise LaunchError(f"gcloud auth list failed ({err}); check the gcloud install") from None
    active = [a["account"] for a in accounts if a.get("status") == "ACTIVE"]
    if not active:
        raise LaunchError("gcloud is not logged in: run `gcloud auth login` (and pick a project)")
    return active[0]


def default_project(executable: str) -> str | None:
    try:
        project = _run([executable, "config", "get-value", "project"], 60).strip()
    except GcloudError:
        return None
    return project or None


def _run(command: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise GcloudError(command[1:], 124, f"timed out after {timeout:.0f}s") from None
    if done.returncode != 0:
        raise GcloudError(command[1:], done.returncode, done.stderr)
    return done.stdout
