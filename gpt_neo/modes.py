"""`main.py`'s modes over a trained checkpoint: --predict, --eval and --export."""

from __future__ import annotations

import sys

from gpt_neo.config import Config, ConfigError
from gpt_neo.tfrecords import write_text_atomic

# GPT-Neo's built-in prompt (main.py: used when --prompt is absent).
DEFAULT_PROMPT = (
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, "
    "previously unexplored valley, in the Andes Mountains. Even more surprising to the "
    "researchers was the fact that the unicorns spoke perfect English."
)


def load_trained(cfg: Config):
    """(params, step) of the latest checkpoint, sharded per the layout; the optimizer state is
    not read."""
    from gpt_neo.checkpoint import Checkpointer
    from gpt_neo.mesh import make_mesh
    from gpt_neo.train import abstract_params

    if not cfg.model_path:
        raise ConfigError("set model_path in the config (where the checkpoints are)")
    checkpointer = Checkpointer(cfg.model_path, cfg.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest_params(cfg, abstract_params(cfg, make_mesh(cfg)))
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(
            f"no checkpoint in {checkpointer.directory}: train first (python main.py --model ...) "
            "or import a Hugging Face model (python -m gpt_neo.hf import HF_DIR --model_path DIR)"
        )
    return restored


def tokenizer_of(cfg: Config):
    """(encoder, eos id) from the model's dataset config; cfg.eos_id wins when set."""
    from gpt_neo.dataset_config import model_dataset
    from gpt_neo.encoders import check_vocab_fits

    dataset = model_dataset(cfg)
    encoder = dataset.encoder()
    check_vocab_fits(encoder, cfg.n_vocab, f"dataset '{dataset.name}'")
    return encoder, cfg.eos_id if cfg.eos_id is not None else dataset.eos_id


def predict(cfg: Config, args) -> int:
    encoder, eos_id = tokenizer_of(cfg)
    params, step = load_trained(cfg)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.interactive:
        return _interactive(cfg, params, encoder, eos_id, sampling, args.max_new_tokens, args.seed)
    if args.prompt:
        with open(args.prompt, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ConfigError(f"prompt file {args.prompt} is empty")
    else:
        text = DEFAULT_PROMPT
    report, path = write_predictions(
        cfg, params, step, text, encoder, eos_id, max_new_tokens=args.max_new_tokens,
        seed=args.seed, **sampling,
    )  # fmt: skip
    print(report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _max_new_tokens(cfg: Config, prompt_ids, requested: int | None) -> int:
    return requested or cfg.predict_max_steps or max(1, cfg.n_ctx - len(prompt_ids))


def write_predictions(
    cfg: Config, params, step: int, text: str, encoder, eos_id, *, max_new_tokens=None, **sampling
) -> tuple[str, str]:
    """predict_batch_size samples continuing `text`, written to model_path/predictions_<step>.txt
    (GPT-Neo's predict mode; also run after each checkpoint when predict_steps > 0).
    Returns (the report, its path)."""
    from gpt_neo.sample import generate

    prompt_ids = encoder.encode(text)
    outputs = generate(
        cfg, params, [prompt_ids] * cfg.predict_batch_size, eos_id=eos_id,
        max_new_tokens=_max_new_tokens(cfg, prompt_ids, max_new_tokens), **sampling,
    )  # fmt: skip
    samples = []
    for i, new in enumerate(outputs):
        body = encoder.decode(new) if cfg.remove_partial_sequences else text + encoder.decode(new)
        samples.append(f"======================================== SAMPLE {i}\n{body}\n")
    report = "".join(samples)
    path = f"{cfg.model_path.rstrip('/')}/predictions_{step}.txt"
    write_text_atomic(path, report)
    return report, path


def _interactive(cfg, params, encoder, eos_id, sampling, max_new_tokens, seed) -> int:
    from gpt_neo.sample import generate

    print("type a prompt and press enter (Ctrl-D to quit)", file=sys.stderr)
    for turn, line in enumerate(sys.stdin):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        prompt_ids = encoder.encode(text)
        generate(
            cfg, params, [prompt_ids], eos_id=eos_id, seed=seed + turn,
            max_new_tokens=_max_new_tokens(cfg, prompt_ids, max_new_tokens),
            on_token=_TextStream(encoder), **sampling,
        )  # fmt: skip
        print(flush=True)
    return 0


class _TextStream:
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


def evaluate(cfg: Config, args) -> int:
    from gpt_neo import evaluate as ev

    tasks = list(args.eval_tasks or cfg.eval_tasks)
    for task, path in (("lambada", args.lambada_path), ("wikitext", args.wikitext_path)):
        if path and task not in tasks:
            tasks.append(task)
    for task in tasks:
        if task not in ("lambada", "wikitext"):
            raise ConfigError(f"unknown eval task {task!r}; known: lambada, wikitext")
        if not getattr(args, f"{task}_path"):
            raise ConfigError(f"eval task {task} needs --{task}_path FILE (local files only)")
    if not tasks and not cfg.eval_steps:
        raise ConfigError(
            "nothing to evaluate: set eval_steps > 0 (eval loss on eval_path) or name a task "
            "(--lambada_path FILE, --wikitext_path FILE)"
        )
    params, step = load_trained(cfg)
    results = {}
    if cfg.eval_steps:
        results["validation"] = _validation(cfg, params)
    if tasks:
        encoder, eos_id = tokenizer_of(cfg)
        scorer = ev.Scorer(cfg, params, batch_size=cfg.eval_batch_size or ev.DEFAULT_BATCH)
        if "lambada" in tasks:
            results["lambada"] = ev.lambada(
                scorer, encoder, args.lambada_path, last_token=args.lambada_last_token
            )
        if "wikitext" in tasks:
            results["wikitext"] = ev.wikitext(
                scorer, encoder, args.wikitext_path, prefix_token=eos_id
            )
    ev.print_table(results, step)
    print(f"wrote {ev.write_results(results, cfg.model_path, step)}", file=sys.stderr)
    return 0


def _validation(cfg: Config, params) -> dict:
    import jax

    from gpt_neo.mesh import make_mesh
    from gpt_neo.train import Trainer
    from gpt_neo.train import evaluate as eval_loss

    batch = cfg.eval_batch_size or cfg.train_batch_size
    if not batch:
        raise ConfigError("set eval_batch_size (or train_batch_size) for the validation loss")
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        metrics = eval_loss(cfg, Trainer(cfg, mesh, batch_size=batch), params, cfg.eval_steps)
    return {"loss": metrics["eval_loss"], "perplexity": metrics["eval_perplexity"]}


def export(cfg: Config, args) -> int:
    from gpt_neo.hf import export_hf

    params, step = load_trained(cfg)
    tokenizer = None
    if cfg.datasets:
        from gpt_neo.dataset_config import model_dataset

        tokenizer = model_dataset(cfg).tokenizer_path
    try:
        out = export_hf(cfg, params, args.export, force=args.force, tokenizer=tokenizer)
    except FileExistsError as err:
        raise ConfigError(f"{err} (--force overwrites)") from None
    print(
        f"exported step {step} to {out}: load it with GPTNeoForCausalLM.from_pretrained({str(out)!r})"
    )
    return 0
