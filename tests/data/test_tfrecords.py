"""create_tfrecords: every input format, exact round trips, modes, resume, bad input."""

import glob
import io
import json
import lzma
import subprocess
import sys
import tarfile

import pytest

from gpt_neo.config import from_dict
from gpt_neo.data import tfrecords
from gpt_neo.data.corpus import list_input_files, wikitext_detokenize
from gpt_neo.data.encoders import load_encoder
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.data.records import iter_records
from gpt_neo.data.tfrecords import TFRecordJob, create_tfrecords
from gpt_neo.errors import EXIT_STORAGE_FULL, ConfigError, DataError
from tests.support.helpers import REPO, SAMPLE_TEXTS, train_tokenizer_file

DOCS = {
    "a.txt": "First plain text document.\nWith two lines.",
    "b.txt": "Second document: naïve café 🚀",
}
JSONL = ["jsonl doc one", "jsonl doc two with more words"]
ZST = ["from an lm_dataformat archive", "another archived document"]
TARRED = ["openwebtext member one", "openwebtext member two"]


def make_corpus(root):
    """A folder with every supported format, one non-UTF-8 file, one empty document."""
    import lm_dataformat

    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text)
    (root / "c.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in JSONL) + "\nnot json\n"
    )
    archive = lm_dataformat.Archive(str(root / "lmd"))
    for text in ZST:
        archive.add_data(text, meta={"source": "test"})
    archive.commit()
    with tarfile.open(root / "owt.xz", "w:xz") as tar:
        for i, text in enumerate(TARRED):
            data = text.encode()
            info = tarfile.TarInfo(f"doc{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "d_latin1.txt").write_bytes("caf\xe9 in latin-1".encode("latin-1"))
    (root / "e_empty.txt").write_text("")
    with lzma.open(root / "f.txt.xz", "wt") as handle:
        handle.write("an xz compressed text document")
    return root


def expected_documents():
    """Source documents in the order list_input_files visits them (sorted paths)."""
    return [
        DOCS["a.txt"],
        DOCS["b.txt"],
        *JSONL,
        "caf\ufffd in latin-1",
        "an xz compressed text document",
        *ZST,
        *TARRED,
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root / "raw"), train_tokenizer_file(
        root, SAMPLE_TEXTS + expected_documents()
    )


def job_for(tmp_path, tokenizer, **kw):
    encoder = load_encoder(tokenizer)
    return TFRecordJob(
        **{
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "encoder": str(tokenizer),
            "separator": (encoder.eos_id,),
            **kw,
        }
    )


def read_back(result):
    return [list(tokens) for path, _ in result.files for tokens in iter_records([path])]


def test_input_files_of_every_format_are_found(corpus):
    files = list_input_files(corpus[0])
    assert files == sorted(files) and len(files) == 8
    assert any(p.name.endswith(".jsonl.zst") and p.parent.name == "lmd" for p in files)


def test_documents_mode_records_decode_to_their_source_exactly(corpus, tmp_path):
    raw, tokenizer = corpus
    result = create_tfrecords(
        job_for(tmp_path, tokenizer), list_input_files(raw), show_progress=False
    )
    encoder = load_encoder(tokenizer)
    records = read_back(result)
    assert all(r[-1] == encoder.eos_id for r in records)
    assert [encoder.decode(r[:-1]) for r in records] == expected_documents()
    stats = result.stats
    assert (stats.empty, stats.utf8_repaired, stats.bad_lines) == (1, 1, 1)
    assert stats.records == len(records) == stats.documents_written


def test_file_names_carry_their_record_counts(corpus, tmp_path):
    raw, tokenizer = corpus
    result = create_tfrecords(
        job_for(tmp_path, tokenizer, files_per=3), list_input_files(raw), show_progress=False
    )
    names = sorted(p.rsplit("/", 1)[1] for p, _ in result.files)
    assert names == [f"t_{i}_{n}.tfrecords" for i, n in enumerate([3, 3, 3, 1])]
    for path, count in result.files:
        assert len(list(iter_records([path]))) == count
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_chunks_mode_records_concatenate_back_to_the_token_stream(corpus, tmp_path):
    raw, tokenizer = corpus
    encoder = load_encoder(tokenizer)
    job = job_for(tmp_path, tokenizer, mode="chunks", chunk_size=7)
    result = create_tfrecords(job, list_input_files(raw), show_progress=False)
    records = read_back(result)
    assert records and all(len(r) == 8 for r in records)
    stream = [t for doc in expected_documents() for t in [*encoder.encode(doc), encoder.eos_id]]
    joined = [t for r in records for t in r]
    assert joined == stream[: len(joined)]
    assert len(stream) - len(joined) == result.stats.tail_tokens_dropped < 8


def test_minimum_size_drops_and_counts_short_documents(corpus, tmp_path):
    raw, tokenizer = corpus
    encoder = load_encoder(tokenizer)
    lengths = [len(encoder.encode(d)) for d in expected_documents()]
    cut = sorted(lengths)[3]
    result = create_tfrecords(
        job_for(tmp_path, tokenizer, minimum_size=cut), list_input_files(raw), show_progress=False
    )
    assert result.stats.too_short == sum(n < cut for n in lengths) == 3
    assert result.stats.records == len(lengths) - 3


def test_several_processes_write_the_same_records_without_name_collisions(
    corpus, tmp_path, monkeypatch
):
    raw, tokenizer = corpus
    monkeypatch.setattr(tfrecords, "UNIT_BYTES", 60)  # several units for few small files
    files = list_input_files(raw)
    one = create_tfrecords(job_for(tmp_path / "one", tokenizer), files, show_progress=False)
    two = create_tfrecords(
        job_for(tmp_path / "two", tokenizer), files, processes=3, show_progress=False
    )
    assert len(tfrecords.plan_units(files)) > 3  # more units than processes
    assert read_back(two) == read_back(one)
    names = [p.rsplit("/", 1)[1] for p, _ in two.files]
    assert len(names) == len(set(names)) == len(two.files) > 1


def test_interrupted_run_resumes_without_redoing_finished_units(corpus, tmp_path, monkeypatch):
    raw, tokenizer = corpus
    monkeypatch.setattr(tfrecords, "UNIT_BYTES", 60)
    files = list_input_files(raw)
    reference = read_back(
        create_tfrecords(job_for(tmp_path / "ref", tokenizer), files, show_progress=False)
    )
    real = tfrecords.process_unit
    calls = []

    def crash_on_third(job, unit, unit_files, progress=None):
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a preempted machine
        return real(job, unit, unit_files, progress)

    job = job_for(tmp_path, tokenizer)
    monkeypatch.setattr(tfrecords, "process_unit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        create_tfrecords(job, files, show_progress=False)
    assert list((tmp_path / "out").glob("*.tfrecords")) == []  # nothing looks complete
    calls.clear()
    monkeypatch.setattr(tfrecords, "process_unit", lambda *a: calls.append(a[1]) or real(*a))
    result = create_tfrecords(job, files, show_progress=False)
    assert 0 not in calls and 1 not in calls  # finished units were not redone
    assert read_back(result) == reference
    again = create_tfrecords(job, files, show_progress=False)
    assert again.already_complete and again.files == result.files


def test_other_settings_in_the_same_output_dir_are_refused(corpus, tmp_path):
    raw, tokenizer = corpus
    files = list_input_files(raw)
    create_tfrecords(job_for(tmp_path, tokenizer), files, show_progress=False)
    with pytest.raises(ConfigError, match="belongs to a run with other inputs or settings"):
        create_tfrecords(job_for(tmp_path, tokenizer, mode="chunks"), files, show_progress=False)


def test_output_dir_that_is_not_writable(corpus, tmp_path):
    raw, tokenizer = corpus
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    job = job_for(tmp_path, tokenizer)
    job = TFRecordJob(**{**job.__dict__, "output_dir": str(blocker / "sub")})
    with pytest.raises(DataError, match="is not writable"):
        create_tfrecords(job, list_input_files(raw), show_progress=False)


def test_non_local_filesystems_work_through_tf_io_gfile(corpus, tmp_path):
    # gs:// goes through the same tf.io.gfile calls; TensorFlow's in-memory ram:// filesystem
    # stands in for it (TF's GCS client has fixed endpoints, so no local emulator can serve it).
    raw, tokenizer = corpus
    job = TFRecordJob(
        name="r",
        output_dir="ram://corpus",
        encoder=str(tokenizer),
        separator=(load_encoder(tokenizer).eos_id,),
    )
    result = create_tfrecords(job, list_input_files(raw), show_progress=False)
    assert result.files[0][0].startswith("ram://corpus/r_0_")
    assert len(read_back(result)) == len(expected_documents())
    # and the training pipeline streams them from there
    dataset = tmp_path / "ram.json"
    dataset.write_text(
        json.dumps({"n_vocab": 400, "path": "ram://corpus/r_*.tfrecords", "eos_id": 0})
    )
    cfg = from_dict(
        {
            "n_embd": 8,
            "n_head": 1,
            "n_layer": 1,
            "n_ctx": 8,
            "n_vocab": 400,
            "train_batch_size": 2,
            "datasets": [[str(dataset), 1, "documents_fixed", 1.0]],
        }
    )
    batch = InputPipeline(cfg, process_index=0, process_count=1).next_batch().tokens
    assert batch.shape == (2, 9)


def test_cli_flags_mean_what_they_say_and_default_off(tmp_path, monkeypatch, capsys):
    from gpt_neo.cli import tfrecords as cli

    args = cli.parse_args(["--input_dir", "x", "--encoder_path", "y"])
    assert (args.ftfy, args.wikitext_detokenize, args.mode, args.write_dataset_config) == (
        False,
        False,
        "documents",
        None,
    )
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "w.txt").write_text("3 @-@ 4 , ( a )")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "wout"
    code = cli.main(
        [
            "--input_dir",
            str(wiki),
            "--name",
            "w",
            "--output_dir",
            str(out),
            "--encoder_path",
            "byte",
            "--wikitext-detokenize",
            "--write_dataset_config",
            "--quiet",
        ]
    )
    assert code == 0
    record = next(iter_records([str(next(out.glob("w_*.tfrecords")))]))
    assert (
        bytes(int(t) for t in record[:-1]).decode()
        == wikitext_detokenize("3 @-@ 4 , ( a )")
        == "3-4, (a)"
    )
    written = json.loads((tmp_path / "configs" / "dataset_configs" / "w.json").read_text())
    assert written["mode"] == "documents" and written["eos_id"] == 256 and written["n_vocab"] == 258
    assert "1 documents read" in capsys.readouterr().out


def test_cli_bad_input_exits_2_with_one_message(tmp_path, capsys):
    from gpt_neo.cli import tfrecords as cli

    (tmp_path / "empty").mkdir()
    assert (
        cli.main(["--input_dir", str(tmp_path / "empty"), "--encoder_path", "byte", "--quiet"]) == 2
    )
    assert "no input files" in capsys.readouterr().err
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{")
    assert cli.main(["--input_dir", str(tmp_path), "--encoder_path", str(bad_tok), "--quiet"]) == 2
    assert "not a Hugging Face tokenizer.json" in capsys.readouterr().err


@pytest.mark.process
def test_running_out_of_space_is_one_line_and_exit_4(tmp_path):
    """A file-size limit (ulimit -f) stands in for a full disk: the writer's error becomes one
    line naming the file, exit 4 (EXIT_STORAGE_FULL), no traceback."""
    raw = tmp_path / "raw"
    raw.mkdir()
    words = ["alpha", "beta", "gamma", "delta"]
    for i in range(4):
        (raw / f"{i}.txt").write_text(" ".join(words[(i * j) % 4] for j in range(20_000)))
    command = [sys.executable, str(REPO / "data" / "create_tfrecords.py"), "--input_dir", str(raw)]
    command += ["--output_dir", str(tmp_path / "out"), "--encoder_path", "byte", "--quiet"]
    done = subprocess.run(
        ["bash", "-c", 'ulimit -f 40 && exec "$@"', "bash", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == EXIT_STORAGE_FULL, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of space (a file-size limit" in errors[0], done.stderr
    assert str(tmp_path / "out") in errors[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("mode", ["documents", "chunks"])
def test_eval_fraction_holds_out_documents_the_dataset_config_names(tmp_path, monkeypatch, mode):
    from gpt_neo.cli import tfrecords as cli
    from gpt_neo.data.tfrecords import held_out

    texts = tmp_path / "texts"
    texts.mkdir()
    documents = [f"document {k}: " + "word " * (k % 7 + 1) for k in range(200)]
    (texts / "all.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    monkeypatch.chdir(tmp_path)
    argv = ["--input_dir", str(texts), "--name", "e", "--output_dir", str(tmp_path / "out"),
            "--encoder_path", "byte", "--eval_fraction", "0.1", "--mode", mode, "--chunk_size",
            "16", "--write_dataset_config", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    config = json.loads((tmp_path / "configs/dataset_configs/e.json").read_text())
    assert config["eval_path"] == f"{tmp_path}/out/eval/e_*.tfrecords"

    def documents_of(pattern):
        files = sorted(glob.glob(pattern))
        stream = [t for record in iter_records(files) for t in record.tolist()]
        text = "".join(chr(t) if t < 256 else "\x00" for t in stream)
        return [d for d in text.split("\x00") if d]

    train, held = documents_of(config["path"]), documents_of(config["eval_path"])
    expected = [d for i, d in enumerate(documents) if held_out(0.1, str(texts / "all.jsonl"), i)]
    if mode == "documents":  # whole documents on each side, none on both, none lost
        assert held == expected and sorted(train + held) == sorted(documents)
    else:  # chunks drop each split's last partial record
        assert "".join(expected).startswith("".join(held)) and len(held) >= len(expected) - 2
    assert 10 <= len(expected) <= 30  # about 10% of 200
