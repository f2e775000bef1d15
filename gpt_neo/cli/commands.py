"""What each mode (`gpt-neo train`, `summary`, ... and `main.py`'s flags) does with its flags:
the last stop of argparse namespaces. Every function here reads `args`, calls the library with
plain values, and prints."""

from __future__ import annotations

import argparse
import functools
import sys
import time
import typing

import jax
import numpy as np
from jax.sharding import NamedSharding

import gpt_neo
from gpt_neo.cli import overrides_of
from gpt_neo.config import Config, auto_keys, require_causal
from gpt_neo.data.dataset_config import model_dataset, model_tokenizer
from gpt_neo.data.diagnostics import check_datasets
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.errors import EXIT_DIVERGED, ConfigError, DataError
from gpt_neo.inference import tasks
from gpt_neo.inference.apply import apply
from gpt_neo.inference.predict import (
    DEFAULT_PROMPT,
    max_new_tokens,
    sample_at_checkpoint,
    write_predictions,
)
from gpt_neo.inference.sample import Sampling, generate
from gpt_neo.interop.hf import export_hf, hf_config
from gpt_neo.mesh import data_parallel_size, make_mesh, mesh_axes
from gpt_neo.models.gpt import init_params
from gpt_neo.planning import aot, auto_layout, layout_picture
from gpt_neo.planning.summary import print_summary
from gpt_neo.storage import delete_tree, exists, join, listdir, read_text
from gpt_neo.training import loop
from gpt_neo.training.checkpoint.checkpointer import Checkpointer, load_params
from gpt_neo.training.checkpoint.run_lock import LOCK_NAME, writer_lock
from gpt_neo.training.metrics import Metrics, with_run_record
from gpt_neo.training.report import write_report
from gpt_neo.training.validation import validation


def load(args: argparse.Namespace) -> Config:
    return gpt_neo.load_config(args.model, overrides=overrides_of(args))


def check_dataset(cfg: Config, args: argparse.Namespace) -> int:
    if not cfg.datasets:
        raise ConfigError("the model config lists no 'datasets' to check")
    return 0 if check_datasets(cfg, max_records=args.check_records) else 1


# --------------------------------------------------------------------------------------------
# summary


def summary(cfg: Config, args: argparse.Namespace) -> int:
    if args.topology:
        devices = aot.topology_devices(args.topology, args.num_slices)  # bad names: before output
        where = f"{args.topology}" + (f" x {args.num_slices}" if args.num_slices > 1 else "")
        train = None
        if auto_keys(cfg):
            choice = auto_layout.choose(cfg, devices)
            print("\n".join(choice.lines()))
            cfg, train = choice.cfg, choice.compiled
        print_summary(cfg)
        try:
            train = train or aot.compile_train_step(cfg, devices)
        except aot.DoesNotFit as err:
            raise ConfigError(f"--topology {where}: the train step {err}") from None
        decode = aot.compile_decode(cfg, devices) if not cfg.mlm_training else None
        for line in aot.report(cfg, where, devices, train, decode):
            print(line)
        return 0
    print_summary(cfg)
    if args.summary_image:
        sizes = mesh_axes(cfg) or {"x": jax.device_count()}
        print(f"wrote {layout_picture.draw(cfg, sizes, args.summary_image)}")
    forward_check(cfg)
    return 0


def forward_check(cfg: Config) -> None:
    """One forward pass over random tokens on the configured mesh, with its loss."""
    sizes = mesh_axes(cfg) or {"x": jax.device_count()}
    needed = int(np.prod(list(sizes.values())))
    if needed != jax.device_count():
        print(
            f"forward pass skipped: mesh_shape needs {needed} devices, {jax.device_count()} "
            f"{jax.default_backend()} device(s) present"
        )
        return
    mesh = make_mesh(cfg)
    batch = data_parallel_size(cfg, mesh)
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (batch, cfg.n_ctx))
    start = time.perf_counter()
    params = init_params(cfg, seed=cfg.seed, mesh=mesh)
    logits = apply(cfg, params, tokens)
    logits.block_until_ready()
    seconds = time.perf_counter() - start
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    loss = -float(np.mean(np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)))
    print(
        f"forward pass on {mesh.size} {jax.default_backend()} devices {dict(mesh.shape)}: "
        f"logits {tuple(logits.shape)} {logits.dtype}, sharded {typing.cast(NamedSharding, logits.sharding).spec}; "
        f"loss at init {loss:.3f} (ln n_vocab = {np.log(cfg.n_vocab):.3f}); "
        f"init+compile+run {seconds:.1f}s"
    )


# --------------------------------------------------------------------------------------------
# Training


def train(cfg: Config, args: argparse.Namespace) -> int:
    model_path = cfg.require_model_path("where checkpoints and logs go")
    if args.steps_per_checkpoint < 1:
        raise ConfigError("--steps_per_checkpoint must be at least 1")
    with writer_lock(model_path):  # before --new deletes anything: a live run is refused
        if args.new:
            _delete_model_path(model_path, args.yes)
        return _train(cfg, args, model_path)


def _train(cfg: Config, args: argparse.Namespace, model_path: str) -> int:
    mesh = make_mesh(cfg)
    pipeline = InputPipeline(cfg, skip_corrupt=args.skip_corrupt_records)
    checkpointer = Checkpointer(model_path, cfg.keep_checkpoints)

    hooks = []
    if cfg.predict_steps:  # GPT-Neo's predict_steps: sample after each checkpoint
        sample = functools.partial(sample_at_checkpoint, cfg)
        hooks.append(loop.CheckpointHook(sample, needs_tokenizer=True))

    def body(run):
        return loop.train(
            cfg,
            mesh,
            steps_per_checkpoint=args.steps_per_checkpoint,
            checkpointer=checkpointer,
            metrics=Metrics(cfg, model_path, run=run),
            pipeline=pipeline,
            hooks=hooks,
        )

    try:
        return with_run_record(
            cfg, model_path, body, sacred_id=args.sacred_id, mongo_url=args.sacred_mongo_url
        )
    except loop.TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        checkpointer.close()


def _delete_model_path(model_path: str, assume_yes: bool) -> None:
    if not exists(model_path):
        return
    if not assume_yes:
        answer = input(f"--new: delete everything in {model_path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise SystemExit("not deleted; nothing done")
    for name in listdir(model_path):
        if name != LOCK_NAME:  # this run's own lock
            delete_tree(join(model_path, name))
    print(f"deleted everything in {model_path}")


# --------------------------------------------------------------------------------------------
# --predict, --interactive


def predict(cfg: Config, args: argparse.Namespace) -> int:
    require_causal(cfg, "--predict")
    Sampling(args.temperature, args.top_k, args.top_p)  # flags checked before a long load
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    encoder, eos_id = model_tokenizer(cfg)
    params, step = load_params(cfg)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.interactive:
        return _interactive(cfg, params, encoder, eos_id, sampling, args)
    text = DEFAULT_PROMPT
    if args.prompt:
        if not exists(args.prompt):
            raise DataError(f"prompt file not found: {args.prompt}")
        text = read_text(args.prompt)
        if not text.strip():
            raise DataError(f"prompt file {args.prompt} is empty")
    report, path = write_predictions(
        cfg,
        params,
        step,
        text,
        encoder,
        eos_id,
        max_new=args.max_new_tokens,
        seed=args.seed,
        **sampling,
    )
    print(report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _interactive(cfg: Config, params, encoder, eos_id, sampling: dict, args) -> int:
    print("type a prompt and press enter (Ctrl-D to quit)", file=sys.stderr)
    for turn, line in enumerate(sys.stdin):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        prompt_ids = encoder.encode(text)
        generate(
            cfg,
            params,
            [prompt_ids],
            eos_id=eos_id,
            seed=args.seed + turn,
            max_new_tokens=max_new_tokens(cfg, prompt_ids, args.max_new_tokens),
            on_token=TextStream(encoder),
            **sampling,
        )
        print(flush=True)
    return 0


class TextStream:
    """Prints a row's text as tokens arrive. Decodes everything so far and prints what is new,
    because one token can hold part of a character (byte-level BPE)."""

    def __init__(self, encoder):
        self.encoder, self.tokens, self.shown = encoder, [], ""

    def __call__(self, tokens: list[int | None]) -> None:
        if tokens[0] is None:  # the row has stopped
            return
        self.tokens.append(tokens[0])
        text = self.encoder.decode(self.tokens)
        print(text[len(self.shown) :], end="", flush=True)
        self.shown = text


# --------------------------------------------------------------------------------------------
# --eval


def evaluate(cfg: Config, args: argparse.Namespace) -> int:
    chosen = list(args.eval_tasks or cfg.eval_tasks)
    for task, path in (("lambada", args.lambada_path), ("wikitext", args.wikitext_path)):
        if path and task not in chosen:
            chosen.append(task)
    for task in chosen:
        if task not in ("lambada", "wikitext"):
            raise ConfigError(f"unknown eval task {task!r}; known: lambada, wikitext")
        if not getattr(args, f"{task}_path"):
            raise ConfigError(f"eval task {task} needs --{task}_path FILE (local or gs://)")
    if chosen:
        require_causal(cfg, f"--eval's {' and '.join(chosen)}")
    if not chosen and not cfg.eval_steps:
        raise ConfigError(
            "nothing to evaluate: set eval_steps > 0 (eval loss on eval_path) or name a task "
            "(--lambada_path FILE, --wikitext_path FILE)"
        )
    params, step = load_params(cfg)
    model_path = cfg.require_model_path("where the checkpoints are")
    results = {}
    if cfg.eval_steps:
        results["validation"] = validation(cfg, params)
    if chosen:
        encoder, eos_id = model_tokenizer(cfg)
        scorer = tasks.Scorer(cfg, params, batch_size=cfg.eval_batch_size or tasks.DEFAULT_BATCH)
        if "lambada" in chosen:
            results["lambada"] = tasks.lambada(
                scorer, encoder, args.lambada_path, last_token=args.lambada_last_token
            )
        if "wikitext" in chosen:
            if eos_id is None:
                raise ConfigError(
                    "wikitext scores each document after an end-of-text token, and the "
                    "tokenizer has none: set eos_id in the dataset config"
                )
            results["wikitext"] = tasks.wikitext(
                scorer, encoder, args.wikitext_path, prefix_token=eos_id
            )
    tasks.print_table(results, step)
    print(f"wrote {tasks.write_results(results, model_path, step)}", file=sys.stderr)
    print(f"wrote {write_report(model_path)}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# --export


def export(cfg: Config, args: argparse.Namespace) -> int:
    # Read on this host's CPU, whole, whatever mesh trained it: an export is host arrays in the
    # end, a laptop exports what a pod trained, and no accelerator must hold the whole model.
    on_host = cfg.replace(mesh_shape="x:1", layout=None, param_layout=None)
    params, step = load_params(on_host, jax.devices("cpu")[:1])
    cfg = on_host
    tokenizer = model_dataset(cfg).tokenizer_path if cfg.datasets else None
    dtype = getattr(args, "dtype", "float32")
    try:
        out = export_hf(
            cfg, params, args.export, force=args.force, tokenizer=tokenizer, dtype=dtype
        )
    except FileExistsError as err:
        raise ConfigError(f"{err} (--force overwrites)") from None
    architecture = hf_config(cfg)["architectures"][0]
    print(
        f"exported step {step} to {out} as a {architecture} ({dtype}): load it with "
        f"AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )
    return 0
