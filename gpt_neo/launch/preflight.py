"""Checks the pod launcher makes before it creates anything: each failure is one `LaunchError`
line (exit 2) naming the problem and the fix, so a typo never costs a slice."""

from __future__ import annotations

import re
import time

from gpt_neo import storage
from gpt_neo.config import Config
from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.launch.gcloud import (
    READY,
    Gcloud,
    GcloudError,
    LaunchError,
    SliceSpec,
    active_account,
    default_project,
)
from gpt_neo.training.checkpoint import run_lock


def hosts_of(accelerator_type: str) -> int | None:
    """Worker VMs of a slice type, from its name (None when the naming is unknown). v2, v3, v4
    and v5p count TensorCores (8 per host); v5e (v5litepod) and v6e count chips (up to 8 on one
    host, else 4 per host)."""
    match = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type)
    if not match:
        return None
    family, count = match.group(1), int(match.group(2))
    if family in ("v2", "v3", "v4", "v5p"):
        return max(1, count // 8)
    if family in ("v5litepod", "v5e", "v6e"):
        return 1 if count <= 8 else count // 4
    return None


def check_account(gcloud: Gcloud) -> str:
    """The logged-in account, and the project when none was given."""
    account = active_account(gcloud.executable)
    if gcloud.project is None:
        gcloud.project = default_project(gcloud.executable)
    if gcloud.project is None:
        raise LaunchError(
            "no Google Cloud project: pass --project P or run `gcloud config set project P`"
        )
    return account


def check_accelerator(gcloud: Gcloud, spec: SliceSpec) -> None:
    known = gcloud.accelerator_types()  # also checks the zone
    if spec.accelerator_type not in known:
        raise LaunchError(
            f"--accelerator_type {spec.accelerator_type} is not offered in {spec.zone}; it offers "
            f"{', '.join(known) or 'no TPUs'}"
        )


def check_storage(cfg: Config, hosts: int, shared_filesystem: bool) -> None:
    """A multi-host slice's workers share no disk: `model_path` and the data must be on `gs://`
    (or, with --shared_filesystem, on a filesystem every worker mounts at the same path)."""
    if hosts <= 1 or shared_filesystem:
        return
    paths = {"model_path": cfg.model_path}
    for entry in cfg.datasets or ():
        dataset = load_dataset_config(entry.dataset_id)
        if dataset.path:
            paths[f"dataset {dataset.name} path"] = dataset.path
        if dataset.eval_path:
            paths[f"dataset {dataset.name} eval_path"] = dataset.eval_path
    for what, path in paths.items():
        if not str(path).startswith("gs://"):
            raise LaunchError(
                f"{what} is {path!r}, a local path, but the slice has {hosts} worker VMs and they "
                "share no disk: put it in a bucket (gs://BUCKET/...), or pass --shared_filesystem "
                "if every worker mounts it at that path"
            )


def check_bucket(model_path: str, project: str | None) -> None:
    """The bucket of a gs:// `model_path` exists and this account can write to it."""
    if not model_path.startswith("gs://"):
        return
    from google.api_core import exceptions
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    bucket_name, _, prefix = model_path[len("gs://") :].partition("/")
    try:
        client = storage.Client(project=project)
        bucket = client.bucket(bucket_name)
        if not bucket.exists():
            raise LaunchError(
                f"model_path {model_path}: bucket gs://{bucket_name} does not exist; create it "
                f"in the slice's region: gcloud storage buckets create gs://{bucket_name} "
                "--location=REGION"
            )
        probe = bucket.blob(f"{prefix.rstrip('/')}/.gpt-neo-write-check".lstrip("/"))
        probe.upload_from_string(b"the TPU launcher checks that it can write here\n")
        probe.delete()
    except DefaultCredentialsError:
        raise LaunchError(
            "cannot check the bucket: no application-default credentials on this machine; run "
            "`gcloud auth application-default login`"
        ) from None
    except exceptions.Forbidden as err:
        raise LaunchError(
            f"model_path {model_path}: this account cannot write to gs://{bucket_name} "
            f"({err.message}); grant it roles/storage.objectAdmin, or pick a bucket it can write"
        ) from None
    except exceptions.GoogleAPIError as err:
        raise LaunchError(f"model_path {model_path}: cannot reach the bucket ({err})") from None


def check_run_lock(
    model_path: str, launch_run: str, gcloud: Gcloud, shared_filesystem: bool
) -> tuple[str, str] | None:
    """Refuse a `model_path` that another live run holds, before anything is created. Returns
    (token, why) of a holder this launcher found gone, which its workers then take the lock
    over from; None when there is nothing to take over (no lock, this launch run's own, or a
    lock the launcher cannot see: a path on the workers' own disks, or a `--shared_filesystem`
    path this machine does not mount)."""
    if not (storage.is_remote(model_path) or shared_filesystem):
        return None
    try:
        holder = run_lock.peek(model_path)
    except Exception as err:
        print(f"launcher: cannot read the run lock of {model_path} ({err}); the workers check it")
        return None
    if holder is None or (holder.launch and holder.launch.run == launch_run):
        return None  # free, or this launch run's: the launcher ends its earlier attempt
    if holder.is_gone(time.time()):
        return holder.token, f"{holder.describe()} has ended"
    if holder.launch is None:
        raise LaunchError(
            f"model_path {model_path} is in use by another run ({holder.describe()}): wait for "
            "it to end or stop it, or choose another model_path; if that run is gone, its lock "
            f"is free after {holder.free_at()} (ten minutes without a refresh)"
        )
    project, zone, name = holder.launch.slice
    try:
        node = Gcloud(zone, project, gcloud.executable).describe_node(name)
    except GcloudError as err:
        raise LaunchError(
            f"model_path {model_path} is in use by {holder.describe()}, and describing TPU "
            f"{name} failed ({err.reason}); rerun when gcloud can tell whether it still exists"
        ) from None
    state = node.get("state", "UNKNOWN") if node else None
    if state != READY:
        return holder.token, f"{holder.describe()} is over: TPU {name} is {state or 'gone'}"
    raise LaunchError(
        f"model_path {model_path} is in use by {holder.describe()}, and TPU {name} is READY: "
        "stop that launcher (Ctrl-C) or delete that slice, or choose another model_path; if "
        f"that run is gone, its lock is free after {holder.free_at()} (ten minutes without a "
        "refresh)"
    )
