"""Every user mistake: one line naming the flag or file, non-zero exit, nothing touched.

These run through click's CliRunner; validation happens before Ray starts, so none of
them needs the session's Ray (and each asserts that none was started).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from click.testing import CliRunner

from lmbatch.jobs.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["infer", *args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    # click's own usage errors add a "Usage:" hint above; the error is still one line.
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def base(tiny_models, corpus, tmp_path):
    return [
        "--model",
        tiny_models["bert"],
        "--input",
        corpus["parquet"],
        "--task",
        "embed",
        "--output",
        str(tmp_path / "out"),
    ]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_missing_input(base, tmp_path):
    assert_user_error(
        run(*with_flag(base, "--input", str(tmp_path / "nope.parquet"))),
        "--input",
        "no such file",
    )


def test_a_gs_uri_this_machine_cannot_reach_is_one_line_in_seconds(base):
    """Without Google Cloud credentials, pyarrow's client retried for minutes before
    a word; the first request now gives up in seconds. (With credentials, the
    bucket does not exist: no such file, also one line.)"""
    given = "gs://lmbatch-no-such-bucket/rows.parquet"
    assert_user_error(run(*with_flag(base, "--input", given)), "--input", given)


def test_glob_matching_nothing(base, tmp_path):
    assert_user_error(
        run(*with_flag(base, "--input", str(tmp_path / "*.parquet"))),
        "--input",
        "no input files matched",
    )


def test_empty_directory(base, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(
        run(*with_flag(base, "--input", str(tmp_path / "empty"))), "--input"
    )


def test_unknown_format(base, tmp_path):
    odd = tmp_path / "rows.txt"
    odd.write_text("text\nhello\n")
    assert_user_error(
        run(*with_flag(base, "--input", str(odd))), "--input-format", "rows.txt"
    )


def test_unreadable_file_names_it(base, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert_user_error(run(*with_flag(base, "--input", str(broken))), "broken.parquet")


def test_missing_text_column(base):
    assert_user_error(run(*base, "--text-column", "body"), "--text-column", "'body'")


def test_missing_id_column(base):
    assert_user_error(run(*base, "--id-column", "key"), "--id-column", "'key'")


def test_a_tokenizers_that_drops_tokens_is_refused_before_anything_is_written(
    base, tmp_path, monkeypatch
):
    """tokenizers 0.23.1-0.23.2 lose a cut text's tokens without a word: the driver
    refuses its own before Ray starts, so no output folder or _job.json is left."""
    import tokenizers

    from lmbatch.actors import tokenize

    monkeypatch.setattr(tokenize, "BROKEN_TOKENIZERS", (tokenizers.__version__,))
    assert_user_error(
        run(*base), f"tokenizers: {tokenizers.__version__} loses", "tokenizers>=0.23.3"
    )
    assert not (tmp_path / "out").exists()


def test_model_dir_missing(base, tmp_path):
    assert_user_error(
        run(*with_flag(base, "--model", str(tmp_path / "m"))),
        "--model",
        "not a directory",
    )


def test_model_dir_not_a_model(base, tmp_path):
    (tmp_path / "m").mkdir()
    assert_user_error(
        run(*with_flag(base, "--model", str(tmp_path / "m"))), "--model", "config.json"
    )


def test_pickle_weights_refused(base, tiny_models, tmp_path):
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_models["bert"], model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    assert_user_error(
        run(*with_flag(base, "--model", str(model))), "--model", "--allow-pickle"
    )


def test_score_with_an_encoder(base):
    assert_user_error(
        run(*with_flag(base, "--task", "score")), "--task", "causal language model"
    )


def test_classify_with_a_causal_lm(base, tiny_models):
    args = with_flag(
        with_flag(base, "--task", "classify"), "--model", tiny_models["gpt2"]
    )
    assert_user_error(run(*args), "--task", "sequence-classification")


@pytest.mark.parametrize(
    "task, flag",
    [
        ("classify", ["--truncate-dim", "8"]),
        ("score", ["--normalize"]),
        ("generate", ["--prompt", "query: "]),
        ("embed", ["--chat-template"]),
        ("embed", ["--pair-column", "text"]),
        ("score", ["--max-new-tokens", "8"]),  # a flag with a default, given
    ],
)
def test_a_flag_of_another_task_is_named(base, tiny_models, task, flag):
    model = {"classify": "bert_cls", "score": "gpt2", "generate": "gpt2"}
    args = with_flag(base, "--task", task)
    args = with_flag(args, "--model", tiny_models[model.get(task, "bert")])
    assert_user_error(run(*args, *flag), flag[0], "applies to --task")


def test_a_flag_of_another_precision_is_named(base):
    assert_user_error(
        run(*base, "--int8-threshold", "3"),
        "--int8-threshold: applies to --precision int8, not auto",
    )


@pytest.mark.parametrize("flag", ["--insecure", "--shared-paths", "--no-wait"])
def test_a_submission_flag_without_a_cluster_is_named(base, flag):
    """Flags that change how a job is submitted, given to a job that runs here."""
    assert_user_error(
        run(*base, flag), f"{flag}: applies to a submission: --address http://HEAD:8265"
    )


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--actor-memory", "1KB"], "1,000 bytes would not hold the model's weights"),
        (["--actor-memory", "2GiB", "--device", "cuda"], "applies to CPU actors"),
    ],
)
def test_an_actor_memory_that_cannot_hold_the_model_is_refused(base, flags, says):
    assert_user_error(run(*base, *flags), "--actor-memory", says)


@pytest.mark.usefixtures("ray_local")
def test_an_actor_memory_under_what_an_actor_holds_is_one_line(base):
    """Above the weights (refused before Ray starts) but under what a CPU actor holds
    with Python and torch: the first batch says so, instead of halving the budget to
    a row a batch and running on over the limit."""
    # pytest's log capture would keep Ray Data's record of the failure, traceback
    # and frames, to the end of the test, and with them the job's actor.
    logging.disable(logging.ERROR)
    try:
        failed = run(*base, "--actor-memory", "200MB")
    finally:
        logging.disable(logging.NOTSET)
    assert_user_error(
        failed,
        "--actor-memory: 191 MiB is less than a CPU actor holds between batches (",
        "MiB: the model, Python and torch), so no batch fits under it; e.g. "
        "--actor-memory ",
    )
    del failed
    # Its actor holds one of the 2 CPUs until the failure is collected; the next job
    # on this Ray (here a dry run) collects it, or a job would wait for the CPU.
    assert run(*base, "--dry-run").exit_code == 0
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU") != 2.0:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)


def test_a_text_paired_with_itself_is_refused(base, tiny_models):
    args = with_flag(base, "--task", "classify")
    args = with_flag(args, "--model", tiny_models["bert_cls"])
    assert_user_error(
        run(*args, "--pair-column", "text"),
        "--pair-column: 'text' is --text-column too: each text would be paired",
    )


def test_unknown_task(base):
    assert_user_error(run(*with_flag(base, "--task", "translate")), "--task")


def test_max_length_beyond_model(base):
    assert_user_error(run(*base, "--max-length", "4096"), "--max-length", "64")


def test_bad_actors(base):
    assert_user_error(run(*base, "--actors", "3,1"), "--actors")
    assert_user_error(run(*base, "--actors", "two"), "--actors")


def test_output_with_files_is_left_alone(base, tmp_path):
    """Files no lmbatch job wrote stay, even with --overwrite: it replaces only an
    earlier lmbatch output, so `--output . --overwrite` cannot empty a project."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "precious.parquet")
    before = (out / "precious.parquet").read_bytes()
    for flags in ((), ("--overwrite",)):
        assert_user_error(
            run(*base, *flags),
            f"--output: {out} holds files no lmbatch job wrote (precious.parquet); "
            "--overwrite replaces only an earlier lmbatch output",
        )
    assert sorted(p.name for p in out.iterdir()) == ["precious.parquet"]
    assert (out / "precious.parquet").read_bytes() == before


def test_output_that_is_a_file(base, tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    assert_user_error(run(*base), "--output", "is a file")


def test_validation_starts_no_ray(base, tmp_path):
    """In a fresh interpreter, since the session's Ray may already be up in this one."""
    args = with_flag(base, "--input", str(tmp_path / "nope.parquet"))
    script = (
        "import sys, ray\n"
        "from click.testing import CliRunner\n"
        "from lmbatch.jobs.cli import cli\n"
        "result = CliRunner().invoke(cli, ['infer', *sys.argv[1:]])\n"
        "assert result.exit_code != 0, result.output\n"
        "print('ray started' if ray.is_initialized() else 'no ray')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "no ray", done.stderr[-2000:]


def test_bad_actor_memory(base):
    assert_user_error(run(*base, "--actor-memory", "lots"), "--actor-memory")
    assert_user_error(run(*base, "--actor-memory", "2XB"), "--actor-memory")


def test_bad_actors_per_gpu(base):
    assert_user_error(run(*base, "--actors-per-gpu", "0"), "--actors-per-gpu")


def test_negative_int8_threshold(base):
    assert_user_error(run(*base, "--int8-threshold", "-1"), "--int8-threshold")


def test_parse_size_units():
    from lmbatch.jobs.options import parse_size

    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1e9") == 1_000_000_000


def test_an_output_that_holds_the_model_is_refused(tiny_models, corpus, tmp_path):
    model = tmp_path / "models" / "bert"
    shutil.copytree(tiny_models["bert"], model)
    before = sorted(p.name for p in model.iterdir())
    for output, where in ((model, "holds"), (model.parent, "holds"),
                          (model / "embeddings", "is inside")):  # fmt: skip
        args = ["--model", str(model), "--output", str(output), "--overwrite"]
        assert_user_error(
            run(*args, "--input", corpus["parquet"], "--task", "embed"),
            f"--output: {output} {where} --model {model}: write the output elsewhere",
        )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - quantize: {method: bf16}\n")
    optimized = CliRunner().invoke(
        cli,
        ["optimize", "--model", str(model), "--recipe", str(recipe), "--output",
         str(model), "--calibration", corpus["parquet"], "--overwrite"],
    )  # fmt: skip
    assert_user_error(optimized, f"--output: {model} holds --model")
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.usefixtures("ray_local")
def test_overwrite_deletes_nothing_when_the_pool_is_refused(base, tmp_path):
    """--actors is checked against the cluster, after Ray is up: still nothing lost."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text("{}")  # an earlier job's output
    (out / "keep.parquet").write_bytes(b"data")
    assert_user_error(run(*base, "--overwrite", "--actors", "9"), "--actors", "at most")
    assert (out / "keep.parquet").read_bytes() == b"data"


def test_cpu_only_precision_on_cuda_refused(base):
    assert_user_error(
        run(*base, "--precision", "cpu-int8", "--device", "cuda"),
        "--precision",
        "CPU only",
    )


def artifact_of(model: str, where, **meta) -> str:
    """``model`` with an lmbatch.json, as an optimize job would leave it."""
    import json
    import shutil

    shutil.copytree(model, where)
    record = {"base_model": "bert", "base_fingerprint": "0", "task": "embed"}
    (where / "lmbatch.json").write_text(json.dumps({**record, "recipe": [], **meta}))
    return str(where)


INT8_LAYER = {"encoder.layer.0.output.dense": {"kind": "int8", "shape": [1, 1]}}
LOWRANK = {"encoder.layer.0.output.dense": {"kind": "lowrank", "shape": [1, 1]}}


def test_cpu_only_artifact_on_cuda_refused(base, tiny_models, tmp_path):
    artifact = artifact_of(tiny_models["bert"], tmp_path / "a", rebuild=INT8_LAYER)
    args = with_flag(base, "--model", artifact)
    assert_user_error(run(*args, "--device", "cuda"), "--model", "--device cpu")


@pytest.mark.parametrize(
    "meta,precision,message",
    [
        ({"rebuild": LOWRANK}, "int8", "its lmbatch modules are not bitsandbytes"),
        ({"precision": "fp16"}, "bf16", "an artifact already in fp16"),
    ],
)
def test_a_precision_the_artifact_cannot_run_in_is_refused_before_ray(
    base, tiny_models, tmp_path, meta, precision, message
):
    # Checked from lmbatch.json on the driver: no actor starts, nothing is deleted.
    artifact = artifact_of(tiny_models["bert"], tmp_path / "a", **meta)
    args = with_flag(base, "--model", artifact)
    assert_user_error(run(*args, "--precision", precision), "--precision", message)


@pytest.mark.parametrize(
    "stored,precision,where,message",
    [
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "fp16", "--precision",
         "quantised by bitsandbytes already in nf4; leave --precision out"),
        ({"load_in_8bit": True}, "nf4", "--precision", "already in int8"),
        ({"load_in_8bit": True}, "int8 --int8-threshold 3", "--int8-threshold",
         "holds int8 weights with the threshold they were quantised by"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "auto", "--model",
         "quantised by bitsandbytes in 4-bit fp4; lmbatch runs checkpoints stored"),
        ({"quant_method": "gptq", "bits": 4}, "auto", "--model",
         "quantised by gptq; lmbatch runs"),
    ],
)  # fmt: skip
def test_a_checkpoint_stored_quantised_is_checked_before_ray(
    base, tiny_models, tmp_path, stored, precision, where, message
):
    """Read off config.json's quantization_config, as transformers reads it."""
    import json

    model = tmp_path / "stored"
    shutil.copytree(tiny_models["bert"], model)
    config = json.loads((model / "config.json").read_text())
    quantization = {"quant_method": "bitsandbytes", **stored}
    config["quantization_config"] = quantization
    (model / "config.json").write_text(json.dumps(config))
    args = with_flag(base, "--model", str(model))
    assert_user_error(run(*args, "--precision", *precision.split()), where, message)


def test_an_address_where_no_ray_answers_is_one_line(monkeypatch):
    # Ray raises ConnectionError once its retries run out (about 20 s for an address
    # that resolves to nothing); raised at once here.
    import ray

    from lmbatch.errors import UserError
    from lmbatch.jobs.session import attach

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.9:6379\n..")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(UserError, match=r"^--address: no Ray answers at 10.0.0.9:6379"):
        attach("10.0.0.9:6379")


@pytest.fixture
def no_tokenizer(tiny_models, tmp_path) -> str:
    """BERT without its tokenizer files: transformers would build an empty tokenizer
    from config.json alone, and every word would be [UNK]."""
    import shutil

    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_models["bert"], model)
    for file in model.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            file.unlink()
    return str(model)


@pytest.mark.usefixtures("ray_local")
def test_a_model_without_tokenizer_files_is_one_line(base, no_tokenizer, tmp_path):
    # The tokenizer loads on a task while the job starts; its error is still one line.
    args = with_flag(base, "--model", no_tokenizer)
    assert_user_error(run(*args), "--model", "no tokenizer files")
    # --overwrite deletes another model's output only once the tokenizer has loaded.
    assert run(*base, "--overwrite").exit_code == 0
    out = tmp_path / "out"
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert_user_error(run(*args, "--overwrite"), "--model", "no tokenizer files")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


def test_a_task_failed_by_a_users_mistake_prints_only_its_line(base, no_tokenizer):
    # Ray Data announces a failed task in ERROR lines of its own; they stay in its log
    # file, off the console, where the user reads the one line.
    from ray_head import LMBATCH

    args = with_flag(base, "--model", no_tokenizer)
    done = subprocess.run(
        [str(LMBATCH), "infer", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert done.stderr.splitlines()[-1].startswith(
        "Error: --model: no tokenizer files"
    ), done.stderr
    printed = done.stdout + done.stderr  # Ray's console handler writes to stdout
    assert not [line for line in printed.splitlines() if "ERROR" in line], printed
    assert "Traceback" not in printed


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("on_long", ["truncate", "chunk"])
def test_a_prompt_that_fills_max_length_is_one_line_and_frees_the_output(
    base, corpus, tmp_path, on_long
):
    """A prompt of 6 words and BERT's 2 special tokens fill --max-length 8: cut from
    the right, every text would be cut to nothing; chunked, no window could hold a
    token of one. The tokenizer's task finds it while the job starts; the job stops
    with its record written and no row, and the corrected job starts over that
    record without --overwrite."""
    args = [*base, "--on-long", on_long, "--prompt", "the a of and to in "]
    assert_user_error(
        run(*args, "--max-length", "8"),
        "--max-length: 8 tokens: no room for a text after the prompt's 6 tokens "
        "and the model's 2 special tokens",
    )
    out = tmp_path / "out"
    assert (out / "_job.json").exists()  # it failed in the job, not before it
    done = run(*args, "--max-length", "9")
    assert done.exit_code == 0, done.output
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == pq.read_metadata(corpus["parquet"]).num_rows
    # Rows written: the output is protected again.
    assert_user_error(run(*args, "--max-length", "9"), "--output", "--overwrite")


@pytest.mark.usefixtures("ray_local")
def test_a_users_mistake_raised_in_a_map_task_is_found_under_rays_wrappers():
    """Ray Data wraps a task's exception in a UserCodeException, whose cause does not
    cross from the task's process; the job's data context has the task's own raised,
    so that the CLI finds the UserError and prints its one line."""
    import ray.data

    from lmbatch.errors import UserError, find_user_error
    from lmbatch.jobs.infer import data_context

    def refuse(batch):
        raise UserError("--on-long", "chunk needs a fast tokenizer")

    with data_context(None), pytest.raises(Exception) as caught:
        ray.data.range(2).map_batches(refuse).materialize()
    found = find_user_error(caught.value)
    assert str(found) == "--on-long: chunk needs a fast tokenizer"


def test_a_users_error_is_one_line_whatever_a_library_said():
    """A library's message quoted in a UserError may run over lines (PyYAML's marks,
    a server's reply); the error keeps its first, in the driver and across a task."""
    import pickle

    from lmbatch.errors import UserError

    error = UserError("--address", "no dashboard at x: 404\n<html>\n  <body>\n")
    assert str(error) == "--address: no dashboard at x: 404"
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
