"""`gpt-neo data tfrecords --sft`: tokens and loss masks of prompt/completion and chat records,
the eval split, and one clear error line (exit 2, nothing final written) for each bad input.

With the `byte` encoder every UTF-8 byte is one token and the end of text is id 256, so the
expected records are written down here as plain Python bytes, and the records are read back
with TensorFlow's own parser, not the reader the trainer uses."""

import hashlib
import json

import pytest
import tensorflow as tf

from gpt_neo.cli import verbs
from gpt_neo.data import tfrecords

EOS = 256  # the byte encoder's <|endoftext|>

# A small chat template: each message as "<|role|>" and its content on lines of their own
# (trim_blocks and lstrip_blocks make the block tags leave no whitespace behind)
LINES_TEMPLATE = """\
{% for message in messages %}
<|{{ message.role }}|>
{{ message.content }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""
# One that ends each assistant message with eos_token, as many Hugging Face templates do
EOS_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% if m.role == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def write_jsonl(folder, name, records):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_sft(tmp_path, data, *extra):
    argv = ["data", "tfrecords", "--sft", "--input_dir", str(data), "--name", "s",
            "--output_dir", str(tmp_path / "out"), "--encoder_path", "byte", "--quiet", *extra]  # fmt: skip
    return verbs.main(argv)


def read_records(folder):
    """(tokens, loss mask) of every record of the `s_*.tfrecords` files in `folder`, in file
    order, parsed by TensorFlow; every record has exactly the two features."""
    files = sorted(folder.glob("s_*.tfrecords"), key=lambda p: int(p.name.split("_")[1]))
    spec = {
        "text": tf.io.VarLenFeature(tf.int64),
        "loss_mask": tf.io.VarLenFeature(tf.int64),
    }
    records = []
    for raw in tf.data.TFRecordDataset([str(f) for f in files]):
        assert set(tf.train.Example.FromString(raw.numpy()).features.feature) == {
            "text",
            "loss_mask",
        }
        parsed = tf.io.parse_single_example(raw, spec)
        records.append(
            tuple(tf.sparse.to_dense(parsed[k]).numpy().tolist() for k in ("text", "loss_mask"))
        )
    return records


def pieces(*parts):
    """The expected record from (text or EOS, mask bit) parts: each byte one token."""
    tokens, mask = [], []
    for part, bit in parts:
        ids = [EOS] if part is EOS else list(part.encode("utf-8"))
        tokens += ids
        mask += [bit] * len(ids)
    return tokens, mask


def test_prompt_completion_records_mask_the_prompt_and_end_with_eos(tmp_path):
    data = write_jsonl(
        tmp_path / "data",
        "pairs.jsonl",
        [
            {"prompt": "Q: 1+1?\nA:", "completion": " 2"},
            "",  # blank lines are skipped
            {"prompt": "", "completion": "naïve <|endoftext|>"},  # literal text, not an eos
        ],
    ).parent
    assert run_sft(tmp_path, data) == 0
    assert read_records(tmp_path / "out") == [
        pieces(("Q: 1+1?\nA:", 0), (" 2", 1), (EOS, 1)),
        pieces(("naïve <|endoftext|>", 1), (EOS, 1)),
    ]
    manifest = json.loads((tmp_path / "out" / "s.manifest.json").read_text())
    assert manifest["mode"] == "sft"
    assert manifest["stats"]["loss_tokens"] == 3 + len("naïve <|endoftext|>".encode()) + 1


def test_chat_records_mask_exactly_the_assistant_messages(tmp_path):
    template = tmp_path / "lines.jinja"
    template.write_text(LINES_TEMPLATE)
    data = write_jsonl(tmp_path / "data", "chat.jsonl", [{"messages": CONVERSATION}]).parent
    assert run_sft(tmp_path, data, "--chat_template", str(template)) == 0
    assert read_records(tmp_path / "out") == [
        pieces(
            ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n", 0),
            ("Hello!\n", 1),
            ("<|user|>\n2+2?\n<|assistant|>\n", 0),
            ("4\n", 1),
            (EOS, 1),  # appended: the rendering does not end with the end of text
        )
    ]


def test_a_templates_eos_token_is_the_eos_id_and_is_not_doubled(tmp_path):
    template = tmp_path / "eos.jinja"
    template.write_text(EOS_TEMPLATE)
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    data = write_jsonl(tmp_path / "data", "chat.jsonl", [{"messages": chat}]).parent
    assert run_sft(tmp_path, data, "--chat_template", str(template)) == 0
    assert read_records(tmp_path / "out") == [
        pieces(
            ("user: Hi\nassistant: ", 0),
            ("Hello", 1),
            (EOS, 1),
            ("user: Bye\nassistant: ", 0),
            ("Ciao", 1),
            (EOS, 1),
        )
    ]


def test_eval_fraction_holds_out_examples_the_dataset_config_names(tmp_path):
    examples = [{"prompt": f"question {k}?", "completion": f" answer {k}"} for k in range(200)]
    data = write_jsonl(tmp_path / "data", "qa.jsonl", examples).parent
    config = tmp_path / "qa.json"
    argv = ["--eval_fraction", "0.1", "--write_dataset_config", str(config)]
    assert run_sft(tmp_path, data, *argv) == 0

    def is_held_out(index):  # the documented rule: a hash of the file name and position
        digest = hashlib.blake2b(f"qa.jsonl:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < 0.1 * 2**64

    def expected(held):
        return [
            pieces((e["prompt"], 0), (e["completion"], 1), (EOS, 1))
            for k, e in enumerate(examples)
            if is_held_out(k) == held
        ]

    assert 10 <= len(expected(True)) <= 30
    assert read_records(tmp_path / "out") == expected(False)
    assert read_records(tmp_path / "out" / "eval") == expected(True)
    written = json.loads(config.read_text())
    assert written["mode"] == "sft" and written["eos_id"] == EOS
    assert written["path"] == f"{tmp_path}/out/s_*.tfrecords"
    assert written["eval_path"] == f"{tmp_path}/out/eval/s_*.tfrecords"


GOOD = {"prompt": "fine", "completion": " record"}
SHOUTY_TEMPLATE = (  # refuses system messages the way Hugging Face templates do
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{{ raise_exception('system messages are not supported') }}{% endif %}"
    "{{ m.content }}{% endfor %}"
)
COUNTING_TEMPLATE = "{{ messages | length }}:{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(
    ("record", "template", "expected"),
    [
        ('{"prompt": "a", "completion": ', None, ["not JSON", "one JSON object per line"]),
        ({"prompt": "a"}, None, ["has 'prompt' but no 'completion'", 'add "completion"']),
        ({"completion": "b"}, None, ["has 'completion' but no 'prompt'", 'add "prompt"']),
        ({"text": "x"}, None, ["neither 'prompt'/'completion' nor 'messages'", "['text']"]),
        ({"messages": CONVERSATION}, None, ["needs --chat_template FILE"]),
        (
            {"messages": CONVERSATION},
            SHOUTY_TEMPLATE,
            ["fails to render", "t.jinja", "system messages are not supported"],
        ),
        ({"messages": CONVERSATION}, COUNTING_TEMPLATE, ["t.jinja is not prefix-stable"]),
    ],
    ids=["not-json", "no-completion", "no-prompt", "neither", "no-template", "render", "prefix"],
)
def test_bad_records_are_one_error_line_naming_file_and_line_and_nothing_final(
    tmp_path, capsys, monkeypatch, record, template, expected
):
    monkeypatch.setattr(tfrecords, "ENCODE_BATCH", 1)  # line 1 is written before line 2 fails
    path = write_jsonl(tmp_path / "data", "bad.jsonl", [GOOD, record])
    extra = ["--write_dataset_config", str(tmp_path / "bad.json")]
    if template is not None:
        (tmp_path / "t.jinja").write_text(template)
        extra += ["--chat_template", str(tmp_path / "t.jinja")]
    assert run_sft(tmp_path, path.parent, *extra) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:2: "), lines
    assert all(text in lines[0] for text in expected), lines[0]
    written = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert [n for n in written if n.endswith((".tfrecords", ".tmp"))] == []
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--mode", "documents"], "--mode does not apply with --sft"),
        (["--chat_template", "{missing}"], "--chat_template {missing}: cannot read it"),
        (["--chat_template", "{broken}"], "broken.jinja:1: not a valid Jinja2 template"),
    ],
    ids=["mode", "missing-template", "template-syntax"],
)
def test_flags_that_do_not_fit_are_refused_before_reading(tmp_path, capsys, flags, expected):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    names = {"missing": tmp_path / "missing.jinja", "broken": tmp_path / "broken.jinja"}
    flags = [f.format(**names) for f in flags]
    data = write_jsonl(tmp_path / "data", "ok.jsonl", [GOOD]).parent
    assert run_sft(tmp_path, data, *flags) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and expected.format(**names) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_chat_template_without_sft_is_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data", "ok.jsonl", [GOOD]).parent
    argv = ["data", "tfrecords", "--input_dir", str(data), "--encoder_path", "byte",
            "--output_dir", str(tmp_path / "out"), "--chat_template", "t.jinja", "--quiet"]  # fmt: skip
    assert verbs.main(argv) == 2
    assert "--chat_template renders the 'messages' records of --sft; add --sft" in (
        capsys.readouterr().err
    )
