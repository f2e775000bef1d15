"""Supervised fine-tuning examples -> token ids and a loss mask (`gpt-neo data tfrecords --sft`).

Fine-tuning on prompts and completions should teach the model to write the completion, not to
predict the prompt, so every token carries a mask bit: 1 where it is a target the loss counts,
0 where it is only context. This module turns one JSON Lines record into that pair; the writer
(`gpt_neo.data.tfrecords`) stores it, one record per example.

A record is one of
- `{"prompt": str, "completion": str}`: prompt tokens (mask 0), then the completion's and the
  end of text (mask 1);
- `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered by a Jinja2 chat template in
  Hugging Face's convention (variables `messages`, `add_generation_prompt`, `bos_token`,
  `eos_token`; a sandboxed environment with `trim_blocks` and `lstrip_blocks`, as
  transformers renders them). Mask 1 is exactly the text each assistant message adds: for
  assistant message i, the rendering of messages[:i] with the generation prompt must be a
  prefix of the rendering of messages[:i+1] without it (the template is *prefix-stable*), and
  the difference is the assistant's span.

The text is tokenized as consecutive pieces (context, assistant span, context, ...), each on
its own, so a mask boundary never falls inside a token. The end of text is the writer's
separator (the tokenizer's end-of-text id unless --separator says otherwise): the template's
`eos_token` renders as a private marker that becomes those ids, so a conversation's literal
text can never turn into an end of text, and a rendering that ends with it gets no second one.
`bos_token` is empty: GPT-Neo's models have no beginning-of-text token.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt_neo.data.corpus import SUFFIXES
from gpt_neo.data.encoders import Encoder
from gpt_neo.errors import ConfigError, DataError, first_line, warn

# What the template's `eos_token` renders as: private-use characters around a name, which no
# text contains by chance (a record that does is refused), replaced by the separator ids
EOS_MARK = "\uf8ff<|sft-end-of-text|>\uf8ff"
BOS_TOKEN = ""

RECORD_FORMATS = (
    '{"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., "content": ...}]}'
)

Segment = tuple[str, bool]  # (text, whether its tokens are targets); EOS_MARK: the end of text


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's file (named in errors) and its Jinja2 source."""

    path: str
    source: str


def load_chat_template(path: str | Path) -> ChatTemplate:
    """The template in `path`, compiled once here so a syntax error stops the run before any
    record is read (ConfigError naming the file and line)."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"--chat_template {path}: cannot read it ({first_line(err)}); give a UTF-8 Jinja2 file"
        ) from None
    template = ChatTemplate(str(path), source)
    _compiled(template)
    return template


@functools.cache
def _compiled(template: ChatTemplate):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # what Hugging Face templates call to refuse a conversation
        raise jinja2.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template.source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(
            f"--chat_template {template.path}:{err.lineno}: not a valid Jinja2 template "
            f"({first_line(err)}); fix the template"
        ) from None


def list_jsonl_files(input_dir: str | Path) -> list[Path]:
    """Every `.jsonl` file under `input_dir` (recursively), sorted, as the writer's units need.
    Other corpus files there are skipped, with a warning saying how many."""
    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(f"--input_dir {root} is not a directory")
    files = sorted(p for p in root.rglob("*.jsonl") if p.is_file())
    if not files:
        raise DataError(
            f"no .jsonl files under {root}; --sft reads JSON Lines, one record per line: "
            f"{RECORD_FORMATS}"
        )
    others = [
        p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES) and p not in files
    ]
    if others:
        warn(f"--sft reads .jsonl files only: skipped {len(others)} other files under {root}")
    return files


def read_examples(path: str, template: ChatTemplate | None) -> Iterator[list[Segment]]:
    """The segments of each record (non-blank line) of the JSON Lines file `path`. Raises
    DataError naming the file, the line and the fix at the first bad record."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{where}: not UTF-8 ({err.reason} at byte {err.start}); save the file as UTF-8"
                ) from None
            if line.strip():
                yield example_segments(_parse(line, where), template, where)


def _parse(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not JSON ({err.msg} at column {err.colno}); write one JSON object per "
            f"line: {RECORD_FORMATS}"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: a JSON {type(record).__name__}, not an object; write one object per line: "
            f"{RECORD_FORMATS}"
        )
    if any(EOS_MARK in text for text in _strings(record)):
        raise DataError(
            f"{where}: contains {EOS_MARK!r}, which this tool reserves for the end of text; "
            "remove it from the record"
        )
    return record


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def example_segments(record: dict, template: ChatTemplate | None, where: str) -> list[Segment]:
    """One record's text as segments that end with the end of text; `where` ("file:line")
    starts every error message."""
    has_pair = "prompt" in record or "completion" in record
    if "messages" in record:
        if has_pair:
            raise DataError(
                f"{where}: has both 'messages' and 'prompt'/'completion'; give each record one "
                "of the two formats"
            )
        if template is None:
            raise DataError(
                f"{where}: a 'messages' record needs --chat_template FILE (a Jinja2 chat "
                "template, e.g. the chat_template of a Hugging Face tokenizer_config.json saved "
                "to a file)"
            )
        return chat_segments(record["messages"], template, where)
    if not has_pair:
        raise DataError(
            f"{where}: has neither 'prompt'/'completion' nor 'messages' (keys: "
            f"{sorted(record)}); write {RECORD_FORMATS}"
        )
    for key, other in (("prompt", "completion"), ("completion", "prompt")):
        if key not in record:
            raise DataError(
                f"{where}: has '{other}' but no '{key}'; add \"{key}\" (a string, \"\" for none)"
            )
        if not isinstance(record[key], str):
            raise DataError(
                f"{where}: '{key}' is a JSON {type(record[key]).__name__}; it must be a string"
            )
    return [(record["prompt"], False), (record["completion"], True), (EOS_MARK, True)]


def chat_segments(messages, template: ChatTemplate, where: str) -> list[Segment]:
    """A conversation rendered by `template`, cut into context and assistant spans (targets),
    ending with the end of text (appended, a target, unless the rendering ends with it)."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of objects with a string 'role', "
            'e.g. [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'
        )
    full = _render(template, messages, False, where)
    segments: list[Segment] = []
    done = 0  # characters of `full` already in segments
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(template, messages[:index], True, where)
        through = _render(template, messages[: index + 1], False, where)
        if not through.startswith(before) or not full.startswith(through) or len(before) < done:
            raise DataError(
                f"{where}: --chat_template {template.path} is not prefix-stable: rendering the "
                f"messages before message {index + 1} (assistant) with add_generation_prompt="
                "true and then through it must extend the same text, so the assistant's span "
                "can be found; make the template's output for the first messages the start of "
                "its output for more"
            )
        segments += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    segments.append((full[done:], False))
    if not full.endswith(EOS_MARK):
        segments.append((EOS_MARK, True))
    return [s for s in segments if s[0]]


def _render(template: ChatTemplate, messages: list, add_generation_prompt: bool, where: str):
    try:
        return _compiled(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=BOS_TOKEN,
            eos_token=EOS_MARK,
        )
    except Exception as err:  # the template is the user's code: any failure is theirs to fix
        raise DataError(
            f"{where}: --chat_template {template.path} fails to render this record "
            f"({type(err).__name__}: {first_line(err)}); fix the template or the record"
        ) from None


def tokenize_examples(
    encoder: Encoder, examples: Sequence[list[Segment]], separator: Sequence[int]
) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each example: every segment's text encoded on its own (one
    batch for all of them), EOS_MARK as the separator ids, each token masked as its segment."""
    texts = [part for ex in examples for text, _ in ex for part in text.split(EOS_MARK) if part]
    encoded = iter(encoder.encode_batch(texts) if texts else [])
    results = []
    for segments in examples:
        tokens: list[int] = []
        mask: list[int] = []
        for text, target in segments:
            for position, part in enumerate(text.split(EOS_MARK)):
                ids = [*(separator if position else ()), *(next(encoded) if part else ())]
                tokens += ids
                mask += [int(target)] * len(ids)
        results.append((tokens, mask))
    return results
