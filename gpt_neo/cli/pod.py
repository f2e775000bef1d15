"""`gpt-neo launch --model cfg.json --tpu NAME --zone Z --accelerator_type T ...` (in main.py:
`--tpu` with any of --zone, --accelerator_type, --project, --queued; `--tpu NAME` alone means
"this TPU VM's own chips" there): the flags of the pod launcher (`gpt_neo.launch.pod`), and
turning them into its options. Nothing here imports JAX: the launcher runs on a
workstation that may not have an accelerator at all.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import gpt_neo
from gpt_neo.cli import overrides_of
from gpt_neo.launch import bundle, preflight
from gpt_neo.launch.gcloud import Gcloud, GcloudError, LaunchError, SliceSpec, find_gcloud
from gpt_neo.launch.pod import PodLauncher, PodOptions, sole_launcher
from gpt_neo.training.checkpoint import run_lock

DEFAULT_SETUP = (
    'python3 -m venv "$HOME/gpt-neo/venv" && "$HOME/gpt-neo/venv/bin/pip" install --quiet '
    "--upgrade pip && \"$HOME/gpt-neo/venv/bin/pip\" install --quiet '.[tpu]'"
)
LAUNCH_FLAGS = ("zone", "accelerator_type", "project", "queued")


def add_pod_flags(parser: argparse.ArgumentParser) -> None:
    pod = parser.add_argument_group(
        "TPU pod launcher (from a workstation with gcloud; docs: TPU pods and preemption)"
    )
    pod.add_argument("--zone", help="the slice's zone, e.g. us-central2-b")
    pod.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    pod.add_argument(
        "--accelerator_type", metavar="TYPE", help="create the slice as this type, e.g. v4-32"
    )
    pod.add_argument(
        "--runtime_version",
        metavar="V",
        help="TPU VM software version (default: the base image of the accelerator's family)",
    )
    kind = pod.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="create a Spot slice (cheaper)")
    kind.add_argument("--preemptible", action="store_true", help="create a preemptible slice")
    pod.add_argument(
        "--queued", action="store_true", help="create it as a queued resource (waits for capacity)"
    )
    pod.add_argument(
        "--heartbeat_timeout",
        type=float,
        default=1800,
        metavar="S",
        help="no new step logged for S seconds: the run is hung, relaunch it (default 1800)",
    )
    pod.add_argument(
        "--initial_heartbeat_timeout",
        type=float,
        default=7200,
        metavar="S",
        help="the same until the first step (setup, compile, restore; default 7200)",
    )
    pod.add_argument(
        "--max_preemptions", type=int, default=100, metavar="N", help="give up after N (100)"
    )
    pod.add_argument(
        "--max_failures",
        type=int,
        default=5,
        metavar="N",
        help="give up after N crashes or hangs of the run itself (5)",
    )
    pod.add_argument(
        "--delete_when_done",
        action="store_true",
        help="delete the slice when the launcher ends (done, gave up or Ctrl-C)",
    )
    pod.add_argument(
        "--worker_setup",
        default=DEFAULT_SETUP,
        metavar="CMD",
        help="run once per worker disk in the code directory (default: a venv with "
        "`pip install .[tpu]`; 'none' for an image that has everything)",
    )
    pod.add_argument(
        "--shared_filesystem",
        action="store_true",
        help="model_path and data are on a filesystem every worker mounts (NFS, Filestore), "
        "not gs://",
    )
    pod.add_argument(
        "--poll_seconds",
        type=float,
        default=60,
        metavar="S",
        help="describe the slice every S seconds while it runs or is created (60)",
    )
    pod.add_argument(
        "--create_retry_seconds",
        type=float,
        default=60,
        metavar="S",
        help="first wait after a capacity error on create, doubling up to 10 min (60)",
    )
    pod.add_argument(
        "--ship",
        action="append",
        default=[],
        metavar="PATH",
        help="also ship this file or folder of the checkout (repeatable); otherwise only what "
        "git tracks is shipped",
    )
    pod.add_argument(
        "--launch_logs",
        type=Path,
        metavar="DIR",
        help="every worker's output, per attempt (default tpu_logs/NAME)",
    )


def launching(args: argparse.Namespace) -> bool:
    return bool(args.tpu) and any(getattr(args, flag) for flag in LAUNCH_FLAGS)


def runtime_version(accelerator_type: str | None) -> str:
    """The base TPU VM image of an accelerator family (gcloud's docs, 2025)."""
    family = (accelerator_type or "").split("-")[0]
    return {
        "v5litepod": "v2-alpha-tpuv5-lite",
        "v5p": "v2-alpha-tpuv5",
        "v6e": "v2-alpha-tpuv6e",
    }.get(family, "tpu-ubuntu2204-base")


def check_slices(cfg, num_slices: int) -> None:
    """`--num_slices N` against the config: a mesh that names its axes must say which cross
    the slices (`dcn_axes`), and their sizes must multiply to N."""
    if num_slices < 1:
        raise LaunchError(f"--num_slices {num_slices}: give 1 or more")
    # load_config checked both keys' syntax; read them here without gpt_neo.mesh (JAX)
    sizes = {}
    if cfg.mesh_shape and cfg.mesh_shape != "auto":
        parts = (p.split(":") for p in cfg.mesh_shape.split(",") if p.strip())
        sizes = {a.strip(): int(n) for a, n in parts}
    crossing = [a.strip() for a in (cfg.dcn_axes or "").split("+") if a.strip()]
    spans = math.prod(sizes[a] for a in crossing) if sizes else num_slices
    if num_slices > 1 and not cfg.mesh_shape:
        raise LaunchError(
            f"--num_slices {num_slices}: set mesh_shape with an axis across the slices (e.g. "
            f'"slice:{num_slices},x:16" and "dcn_axes": "slice"), or "mesh_shape": "auto"'
        )
    if sizes and num_slices > 1 and not crossing:
        raise LaunchError(
            f"--num_slices {num_slices}: the mesh '{cfg.mesh_shape}' does not say which axis "
            f'crosses the slices; set "dcn_axes" (e.g. mesh_shape slice:{num_slices},... and '
            'dcn_axes "slice") or "mesh_shape": "auto"'
        )
    if spans != num_slices:
        raise LaunchError(
            f"dcn_axes '{cfg.dcn_axes}' spans {spans} slices in mesh_shape '{cfg.mesh_shape}', "
            f"but --num_slices is {num_slices}: make them agree"
        )


def launch_pod(args: argparse.Namespace) -> int:
    if not args.zone:
        raise LaunchError(f"--tpu {args.tpu} with launcher flags needs --zone")
    cfg = gpt_neo.load_config(args.model, overrides=overrides_of(args))  # bad configs stop here
    if not cfg.model_path:
        raise LaunchError("set model_path in the config (gs://BUCKET/run for a multi-host slice)")
    provisioning = "spot" if args.spot else "preemptible" if args.preemptible else "standard"
    check_slices(cfg, args.num_slices)
    spec = SliceSpec(
        name=args.tpu,
        zone=args.zone,
        project=args.project,
        accelerator_type=args.accelerator_type,
        runtime_version=args.runtime_version or runtime_version(args.accelerator_type),
        provisioning=provisioning,
        queued=args.queued or args.num_slices > 1,  # several slices: one queued resource
        num_slices=args.num_slices,
    )
    gcloud = Gcloud(args.zone, args.project, find_gcloud())
    account = preflight.check_account(gcloud)
    if spec.accelerator_type:
        preflight.check_accelerator(gcloud, spec)  # also checks the zone
    try:
        node = gcloud.describe_node(spec.nodes[0])
    except GcloudError as err:
        raise LaunchError(f"cannot describe TPU {spec.nodes[0]} in {spec.zone}: {err}") from None
    hosts = len(node["networkEndpoints"]) if node and node.get("networkEndpoints") else None
    accelerator = spec.accelerator_type or (node or {}).get("acceleratorType", "")
    hosts = hosts or preflight.hosts_of(accelerator) or 2  # unknown naming: assume several
    hosts *= spec.num_slices
    preflight.check_storage(cfg, hosts, args.shared_filesystem)
    preflight.check_bucket(cfg.model_path, gcloud.project)
    assert gcloud.project is not None  # check_account found it
    launch_run = run_lock.node_path(gcloud.project, spec.zone, spec.name)
    with sole_launcher(launch_run):  # held until the launcher ends
        takeover = preflight.check_run_lock(
            cfg.model_path, launch_run, gcloud, args.shared_filesystem
        )
        if args.new and not args.yes:
            answer = input(f"--new: delete everything in {cfg.model_path} first? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise SystemExit("not deleted; nothing done")
        shipped = bundle.build(cfg, ship=args.ship)
        worker_args = ["--steps_per_checkpoint", str(args.steps_per_checkpoint)]
        worker_args += ["--sacred_id", args.sacred_id]
        for flag in ("sacred_mongo_url", "compilation_cache"):
            if value := getattr(args, flag):
                worker_args += [f"--{flag}", value]
        if args.skip_corrupt_records:
            worker_args.append("--skip_corrupt_records")
        options = PodOptions(
            spec=spec,
            worker_args=worker_args,
            launch_run=launch_run,
            takeover=takeover[0] if takeover else None,
            first_attempt_args=["--new", "--yes"] if args.new else [],
            worker_setup=None if args.worker_setup == "none" else args.worker_setup,
            heartbeat_timeout=args.heartbeat_timeout,
            initial_heartbeat_timeout=args.initial_heartbeat_timeout,
            poll_seconds=args.poll_seconds,
            max_preemptions=args.max_preemptions,
            max_failures=args.max_failures,
            create_retry_seconds=args.create_retry_seconds,
            delete_when_done=args.delete_when_done,
            log_dir=args.launch_logs or Path("tpu_logs") / args.tpu,
        )
        slices = (
            f" ({spec.num_slices} slices: {', '.join(spec.nodes)})" if spec.num_slices > 1 else ""
        )
        print(
            f"launcher: TPU {spec.name}{slices} in {spec.zone} (project {gcloud.project}, "
            f"account {account}), {hosts} worker(s), model_path {cfg.model_path}",
            flush=True,
        )
        if takeover:
            print(
                f"launcher: run lock of {cfg.model_path}: {takeover[1]}; the workers take it over"
            )
        if shipped.untracked:
            listed = ", ".join(shipped.untracked[:5]) + (" ..." * (len(shipped.untracked) > 5))
            print(
                f"launcher: not shipped: {len(shipped.untracked)} file(s) git does not track "
                f"({listed}); `git add` them or pass --ship PATH",
                flush=True,
            )
        return PodLauncher(options, shipped, gcloud).run()
