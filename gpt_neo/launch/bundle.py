"""What the pod launcher ships to every worker: this checkout's code and the run's config, as one
tarball named by the hash of its contents.

The code is what git tracks (as it is in the working tree, uncommitted edits included), plus
any `--ship` paths: a checkout collects outputs (a notebook's working folder, logs, datasets)
that must not travel to every worker, so untracked files stay home and the launcher names them.

The config is shipped resolved (every `--model` file merged, `--set` applied), and the dataset
configs and local tokenizer files it names are shipped beside it, so a worker needs nothing
from the workstation's disk. Data itself is not shipped: a multi-host run reads it from `gs://`
(checked by `preflight`).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt_neo.config import REPO_ROOT, Config, to_dict
from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.errors import ConfigError

RUN_DIR = "run"  # inside the bundle: config.json, datasets/, tokenizers/
BUILTIN_TOKENIZERS = ("byte", "gpt2")
# Without git (an unpacked release), what a worker needs to run main.py and pip install it.
FALLBACK_FILES = ("main.py", "pyproject.toml", "setup.py", "README.md", "LICENSE")
FALLBACK_DIRS = ("gpt_neo", "configs", "data")


@dataclass(frozen=True)
class Bundle:
    data: bytes  # a .tgz
    digest: str  # of the contents: the workers' code directory is named after it
    setup_digest: str  # of what `pip install .` reads: setup reruns only when it changes
    config_path: str  # the run's config inside the bundle, for `main.py --model`
    files: int = 0
    untracked: tuple[str, ...] = ()  # files of the checkout left out (git does not track them)

    @property
    def name(self) -> str:
        return f"gpt-neo-{self.digest}.tgz"


def build(cfg: Config, root: Path = REPO_ROOT, ship: Sequence[str] = ()) -> Bundle:
    """The bundle of `cfg`'s run: the checkout's tracked files, the `ship` paths (files or
    folders inside the checkout) and the run's config files."""
    code, untracked = code_files(root)
    code = sorted(set(code) | set(shipped_files(root, ship)))
    files = {path: (root / path).read_bytes() for path in code}
    files |= run_files(cfg)
    digest = _digest(files)
    setup = {k: v for k, v in files.items() if k in ("pyproject.toml", "setup.py")}
    left_out = tuple(p for p in untracked if p not in files)
    return Bundle(
        _tar(files), digest, _digest(setup), f"{RUN_DIR}/config.json", len(files), left_out
    )


def code_files(root: Path) -> tuple[list[str], list[str]]:
    """(the checkout's tracked files, its untracked files that git does not ignore); without
    git (an unpacked release), the package and the entry points, and nothing untracked."""
    try:
        tracked, untracked = (
            _git_files(root, "--cached"),
            _git_files(root, "--others", "--exclude-standard"),
        )
    except (OSError, subprocess.CalledProcessError):
        found = [name for name in FALLBACK_FILES if (root / name).is_file()]
        for folder in FALLBACK_DIRS:
            found += [
                str(p.relative_to(root))
                for p in (root / folder).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            ]
        return sorted(found), []
    return tracked, untracked


def _git_files(root: Path, *which: str) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", *which],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(p for p in set(listed.split("\0")) if p and (root / p).is_file())


def shipped_files(root: Path, paths: Sequence[str]) -> list[str]:
    """The files of `--ship` paths, relative to the checkout; a path outside it or missing is
    a `ConfigError`."""
    found = []
    for given in paths:
        path = Path(given).resolve()
        if not path.exists():
            raise ConfigError(f"--ship {given}: no such file or folder")
        if not path.is_relative_to(root.resolve()):
            raise ConfigError(
                f"--ship {given}: not inside the checkout {root}; workers run from a copy of "
                "the checkout, so ship files that live in it"
            )
        members = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found += [str(p.relative_to(root.resolve())) for p in members]
    return found


def run_files(cfg: Config) -> dict[str, bytes]:
    """`run/config.json` and the dataset configs and tokenizer files it names, rewritten to
    point inside the bundle."""
    config = to_dict(cfg)
    files = {}
    for entry in config["datasets"] or []:
        dataset = load_dataset_config(entry[0])
        raw = dataset.to_json()
        tokenizer = raw.get("tokenizer_path")
        if tokenizer and tokenizer not in BUILTIN_TOKENIZERS and "://" not in tokenizer:
            source = Path(tokenizer)
            target = f"{RUN_DIR}/tokenizers/{dataset.name}/{source.name}"
            if source.is_dir():
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    files[f"{target}/{path.relative_to(source)}"] = path.read_bytes()
            elif source.is_file():
                files[target] = source.read_bytes()
            raw["tokenizer_path"] = target
        entry[0] = f"{RUN_DIR}/datasets/{dataset.name}.json"
        files[entry[0]] = (json.dumps(raw, indent=2) + "\n").encode()
    files[f"{RUN_DIR}/config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()[:16]


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), 0o644
            if name == "main.py" or name.endswith(".sh"):
                info.mode = 0o755
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()
