"""Shared test helpers: paths, a tiny config, random Hugging Face GPT-Neo models, datasets."""

import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np

from gpt_neo.config import from_dict
from gpt_neo.mesh import check_layout
from gpt_neo.models.gpt import init_params
from tests.support.devices import cpu_flags

REPO = Path(__file__).resolve().parents[2]  # tests/support/helpers.py -> the checkout


# Files of the original GPT-Neo (MIT-licensed; tests/fixtures/LICENSE-GPT-NEO): its configs, a
# checkpoint its own code trained, and the keys its code reads
FIXTURES = REPO / "tests" / "fixtures"
GPT_NEO_CONFIGS = FIXTURES / "gpt-neo-configs"
MESH_TF_CHECKPOINT = FIXTURES / "gpt-neo-mesh-tf" / "A"
GPT_NEO_MODEL_KEYS = FIXTURES / "gpt-neo-model-keys.txt"


# The vocabulary of write_text_dataset's repetitive English.
PANGRAM = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex"
WORDS = PANGRAM.split()


# A model that trains in seconds, and the run keys of the training tests: data parallel over x,
# heads over y, on the 8 simulated devices.
SMALL_MODEL = {
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "n_ctx": 32,
    "n_vocab": 320,
    "attention_types": ["global", "local"],
    "local_attention_radius": 8,
}
SMALL_RUN = {
    **SMALL_MODEL,
    "train_batch_size": 8,
    "iterations": 1,
    "lr": 3e-3,
    "warmup_steps": 2,
    "mesh_shape": "x:4,y:2",
    "layout": "batch:x,heads:y",
}


def write_config(path: Path, keys: dict) -> str:
    """A model config JSON at `path`; returns the path as main.py takes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keys))
    return str(path)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once per test session, shared by pytest-xdist's
    workers (which would otherwise each build a module fixture's expensive run): the first
    worker to ask builds it under a file lock, the others wait and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / f"shared-{name}"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


def tiny_config(**overrides):
    """A small model with every layer kind; override any key."""
    keys = {
        "n_embd": 64,
        "n_head": 8,
        "n_layer": 4,
        "n_ctx": 32,
        "n_vocab": 128,
        "attention_types": ["global", "local", "linear", "none"],
        "local_attention_radius": 8,
    }
    cfg = from_dict({**keys, **overrides}, source="tiny_config")
    check_layout(cfg, "tiny_config")  # as gpt_neo.load_config does
    return cfg


def input_config(datasets, **overrides):
    """A one-layer model for input-pipeline tests: n_ctx 16, every token id valid."""
    keys = {
        "n_embd": 8,
        "n_head": 1,
        "n_layer": 1,
        "n_ctx": 16,
        "n_vocab": 1_000_000,
        "train_batch_size": 4,
        "datasets": datasets,
    }
    return from_dict({**keys, **overrides})


def perturbed_params(cfg, seed=0):
    """Initialised params with every leaf nudged, so zero biases and unit gains get tested."""
    params = init_params(cfg, seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )


def train_steps(cfg, mesh, batches, seed):
    """The train state after one step per batch on `mesh`, from the init of `seed`."""
    from gpt_neo.training.trainer import Trainer

    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(seed)
    with jax.set_mesh(mesh):
        for batch in batches:
            state, _ = trainer.step(state, trainer.place(batch))
    return state


def assert_trained_alike(params, reference, lr):
    """The weights of two layouts of one run after a few Adam steps. Adam divides each
    gradient by its own running scale, so float reassociation in a rare near-zero gradient can
    move that one weight by a sliver of a step (2.3% of lr seen): hold every weight to 5% of one
    step, and the weights as a whole (their mean difference) much closer."""
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=0.05 * lr)
        assert np.abs(np.asarray(a) - np.asarray(b)).mean() < 1e-6


def train_on(cfg, mesh, batches, seed=5):
    """`cfg` trained from seed `seed` on `mesh`, one step per batch: the final state and the
    last step's loss."""
    from gpt_neo.training.trainer import Trainer

    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(seed)
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = trainer.step(state, trainer.place(batch))
    return state, float(metrics["loss"])


def lowered_train_step(cfg, devices):
    """The train step of `cfg` lowered for `devices` (a TPU topology's: compile it with the TPU
    compiler), on abstract state and batches."""
    from gpt_neo.mesh import make_mesh
    from gpt_neo.planning import aot
    from gpt_neo.training.trainer import Trainer

    mesh = make_mesh(cfg, devices)
    trainer = Trainer(cfg, mesh)
    with jax.set_mesh(mesh):
        return trainer.step.lower(trainer.abstract_state(), aot.abstract_batch(cfg, trainer))


def random_tokens(cfg, batch=8, length=None, seed=0):
    length = cfg.n_ctx if length is None else length
    return np.random.default_rng(seed).integers(0, cfg.n_vocab, (batch, length)).astype(np.int32)


# Mixed global/local layers and a window (7) much shorter than the sequence (64).
HF_CONFIG = dict(
    vocab_size=211,
    max_position_embeddings=64,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    attention_types=[[["global", "local"], 2]],
    window_size=7,
)


def random_hf_model(folder, *, seed=0, safetensors=True, **config):
    """Save a random-weight GPTNeoForCausalLM (no download) with every weight perturbed,
    so that LayerNorm gains and biases are not at their trivial init values."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(GPTNeoConfig(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    if safetensors:
        model.save_pretrained(folder)
    else:  # the legacy format older checkpoints ship; transformers 5 no longer writes it
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


SAMPLE_TEXTS = [
    "def f(x):\n    return x + 1\n",
    "  leading spaces and trailing  \n\n",
    "Unicode: naïve café — “quotes” ﬁ ligature, full-width ２０２６, emoji 🚀, tab\tend",
    "A literal <|endoftext|> inside a document stays text.",
    "Ünïcödé " * 20,
]


# Prompts of several lengths (one of a single token) for greedy decoding against transformers
GREEDY_PROMPTS = [[11, 22, 33], [5, 6, 7, 8, 9, 10, 12, 14, 200], [1]]


def assert_gradients_equal_transformers(cfg, params, model, tokens):
    """Our loss and every parameter's gradient equal PyTorch autograd through the Hugging Face
    `model` (the same weights) on `tokens`, with the labels its forward shifts itself."""
    import torch

    from gpt_neo.interop.hf import hf_state_dict
    from gpt_neo.training.step import loss_fn

    (loss, _), grads = jax.jit(
        jax.value_and_grad(lambda p: loss_fn(cfg, p, tokens, None), has_aux=True)
    )(params)
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    model.zero_grad()
    hf_loss = model(input_ids=ids, labels=ids).loss
    hf_loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    assert abs(float(loss) - hf_loss.item()) < 1e-5
    ours = hf_state_dict(cfg, grads)
    assert ours.keys() <= hf_grads.keys()
    for name, grad in ours.items():
        scale = np.abs(hf_grads[name]).max()
        np.testing.assert_allclose(grad, hf_grads[name], atol=1e-4 * scale, err_msg=name)


def assert_greedy_equals_hf_generate(cfg, params, model, new_tokens, prompts=GREEDY_PROMPTS):
    """`gpt_neo.generate` at temperature 0 equals transformers' greedy `generate` of `model`
    (no end-of-text: every row makes `new_tokens` tokens), prompt by prompt."""
    import torch

    import gpt_neo

    ours = gpt_neo.generate(
        cfg, params, prompts, max_new_tokens=new_tokens, temperature=0.0, eos_id=None
    )
    for prompt, new in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert new == theirs[0, len(prompt) :].tolist(), prompt


def train_tokenizer_file(folder, texts=SAMPLE_TEXTS, vocab_size=400):
    """A small byte-level BPE trained on the fly; returns its tokenizer.json path."""
    from gpt_neo.data.encoders import TRAINED_TOKENIZER_NAME, train_byte_level_bpe

    tokenizer = train_byte_level_bpe(texts * 20, vocab_size)
    path = Path(folder) / TRAINED_TOKENIZER_NAME
    tokenizer.save(str(path))
    return path


def document(doc_id: int, length: int, eos: int = 0) -> list[int]:
    """Tokens doc_id*1000 + 1, + 2, ... then eos: position and source readable from any token."""
    return [doc_id * 1000 + j for j in range(1, length + 1)] + [eos]


def write_dataset(
    folder,
    name,
    docs_per_file,
    *,
    first_id=1,
    lengths=(5, 9, 23),
    mode="documents",
    eval_docs=None,
    n_vocab=1_000_000,
    n_ctx=16,
    eos=0,
):
    """TFRecord files + a dataset config; returns (config path, {doc_id: tokens})."""
    folder.mkdir(parents=True, exist_ok=True)
    docs, doc_id = {}, first_id
    for file_index, count in enumerate(docs_per_file):
        with _tf().io.TFRecordWriter(
            str(folder / f"{name}_{file_index}_{count}.tfrecords")
        ) as writer:
            for k in range(count):
                tokens = document(doc_id, lengths[k % len(lengths)], eos)
                if mode == "chunks":
                    tokens = (tokens * n_ctx)[: n_ctx + 1]
                docs[doc_id] = tokens
                writer.write(_serialize(tokens))
                doc_id += 1
    config = {
        "n_vocab": n_vocab,
        "path": str(folder / f"{name}_*.tfrecords"),
        "eos_id": eos,
        "padding_id": eos,
        "tokenizer_path": "byte",
        "mode": mode,
    }
    if eval_docs:
        with _tf().io.TFRecordWriter(str(folder / f"{name}eval_0_{eval_docs}.tfrecords")) as writer:
            for k in range(eval_docs):
                writer.write(_serialize(document(900 + k, 30, eos)))
        config["eval_path"] = str(folder / f"{name}eval_*.tfrecords")
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path), docs


def _tf():
    from gpt_neo.storage import tf

    return tf()


def _serialize(tokens):
    from gpt_neo.data.tfrecords import serialize

    return serialize(tokens)


def write_text_dataset(folder, *, docs=60, eval_docs=8, seed=0, files_per=100_000):
    """A learnable byte-level dataset (repetitive English), train and eval, through
    create_tfrecords; returns the dataset config path. n_vocab must be at least 258."""
    import random

    from gpt_neo.data.corpus import list_input_files
    from gpt_neo.data.tfrecords import TFRecordJob, create_tfrecords

    rng = random.Random(seed)
    folder = Path(folder)
    for split, count in (("train", docs), ("eval", eval_docs)):
        raw = folder / "raw" / split
        raw.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            start = rng.randrange(len(WORDS))
            sentence = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(20, 60)))
            (raw / f"{k:04d}.txt").write_text(sentence.capitalize() + ".")
        job = TFRecordJob(
            name=split,
            output_dir=str(folder / "tfrecords"),
            encoder="byte",
            separator=(256,),
            files_per=files_per,
        )
        create_tfrecords(job, list_input_files(raw), show_progress=False)
    config = {
        "n_vocab": 258,
        "path": str(folder / "tfrecords" / "train_*.tfrecords"),
        "eval_path": str(folder / "tfrecords" / "eval_*.tfrecords"),
        "tokenizer_path": "byte",
        "eos_id": 256,
        "padding_id": 257,
        "mode": "documents",
    }
    path = folder / "text.json"
    path.write_text(json.dumps(config))
    return str(path)


def restore_params(state_dir):
    """The params of a saved train state, on this process's first device, whatever the mesh
    or process count that wrote it."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(str(state_dir)).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
    return checkpointer.restore(str(state_dir), target)["params"]


def start_main(*args: str, devices: int = 8):
    """`python main.py ARGS` as a real process on `devices` simulated CPU devices."""
    import sys

    env = {
        **os.environ,
        "XLA_FLAGS": cpu_flags(devices),
        "JAX_PLATFORMS": "cpu",
        # several processes on a loaded 2-core machine can miss JAX's 100 s of heartbeats
        "GPT_NEO_HEARTBEAT_TIMEOUT": "900",
    }
    command = [sys.executable, str(REPO / "main.py"), *args]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def parse_report(text: str) -> dict:
    """report.html parsed with the standard library's HTML parser: its table rows (lists of
    cell texts), image sources and <pre> texts."""
    from html.parser import HTMLParser

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.images, self.pre, self._cell, self._in_pre = [], [], [], None, False

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag == "td":
                self._cell = ""
            elif tag == "img":
                self.images.append(dict(attrs)["src"])
            elif tag == "pre":
                self._in_pre = True
                self.pre.append("")

        def handle_endtag(self, tag):
            if tag == "td":
                self.rows[-1].append(self._cell)
                self._cell = None
            elif tag == "pre":
                self._in_pre = False

        def handle_data(self, data):
            if self._cell is not None:
                self._cell += data
            if self._in_pre:
                self.pre[-1] += data

    parser = Parser()
    parser.feed(text)
    return {"rows": [r for r in parser.rows if r], "images": parser.images, "pre": parser.pre}
