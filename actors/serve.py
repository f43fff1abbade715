"""A Ray Serve deployment of the infer job's tokenizer, loader and predictor.

    POST /  {"inputs": ["text", ...]}
            classify and score also take text pairs: {"inputs": [["a", "b"], ...]}
            (score with a chat template takes pairs only: [message, answer]);
            generate that samples (--temperature) also a "seed": 7
        -> one ``predict`` call per text, gathered by ``@serve.batch`` across requests
        -> tokenize_batch + Predictor, the same code an infer job's actors run
        -> {"results": [{<task columns>, "error": null | "kind: why"}, ...]}
    GET /stats  {"batches": n, "texts": n, "largest_batch": n}
    any other path: 404

A malformed request is answered 400 with one line saying what is wrong; a bad text
inside a good request gets its ``error`` value, as a bad row does in a job.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from lmbatch.actors.model_info import PAIR_TASKS
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import Predictor
from lmbatch.actors.text import json_kind
from lmbatch.actors.tokenize import TokenizeConfig, actor_batch

MAX_INPUTS = 1024  # texts per request; more is a job for `lmbatch infer`
USAGE = 'expected a JSON object {"inputs": ["text", ...]}'
Input = str | tuple[str, str]  # a text, or a text pair (classify, score)
Item = tuple[Input, int | None]  # an input and its request's seed


@dataclass(frozen=True)
class Accepts:
    """What an endpoint's requests may hold."""

    pairs: bool = False  # text pairs (classify, score)
    single: bool = True  # single texts (all but score with a chat template)
    seed: bool = False  # a "seed" (generate that samples)


@dataclass(frozen=True)
class Asked:
    """A well-formed request."""

    inputs: list[Input]
    seed: int | None = None


@dataclass(frozen=True)
class EndpointConfig:
    predictor: PredictorConfig
    tokenize: TokenizeConfig
    max_batch_size: int = 32  # texts per model call, across requests
    batch_wait_ms: float = 10.0  # how long a batch waits to fill


class BadRequest(ValueError):
    """A request the endpoint answers 400."""


@serve.deployment
class Endpoint:
    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.predictor = Predictor(config.predictor)
        self.predict.set_max_batch_size(config.max_batch_size)
        self.predict.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        self.stats = {"batches": 0, "texts": 0, "largest_batch": 0}

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if path == "/stats":
            return JSONResponse(self.stats)
        if path:  # a typo'd path must not run the model as if it were "/"
            return JSONResponse(
                {"error": f"no such path {request.url.path}; POST / or GET /stats"},
                status_code=404,
            )
        if request.method != "POST":
            return JSONResponse({"error": f"use POST; {USAGE}"}, status_code=405)
        try:
            asked = parse_request(await request.body(), self.accepts())
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        items = [(given, asked.seed) for given in asked.inputs]
        results = await asyncio.gather(*(self.predict(item) for item in items))
        return JSONResponse({"results": results})

    def accepts(self) -> Accepts:
        """What this endpoint's task reads. A chat template's score scores an
        answer to a message, so it takes pairs only."""
        config = self.config
        task = config.predictor.model.task
        return Accepts(
            pairs=task in PAIR_TASKS,
            single=not (task == "score" and config.tokenize.chat),
            seed=config.predictor.sampling is not None,
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict(self, items: list[Item]) -> list[dict]:
        self.stats["batches"] += 1
        self.stats["texts"] += len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        # The model runs off the event loop, so the next batch fills meanwhile.
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[Item]) -> list[dict]:
        """Texts and text pairs, each kind in a model call of its own: they tokenize
        differently. Results in the order of ``items``."""
        results: list[dict] = [{}] * len(items)
        for kind in (str, tuple):
            rows = [i for i, (given, _) in enumerate(items) if isinstance(given, kind)]
            if not rows:
                continue
            texts = [items[i][0] for i in rows]
            ids = [draw_key(*items[i]) for i in rows]
            pairs = None
            if kind is tuple:
                texts, pairs = [t for t, _ in texts], [p for _, p in texts]
            batch = actor_batch(texts, self.config.tokenize, pairs, ids)
            out = self.predictor(batch)
            for i, row in zip(rows, out.drop_columns(["id"]).to_pylist(), strict=True):
                results[i] = _jsonable(row)
        return results


def draw_key(given: Input, seed: int | None) -> str:
    """The id a sampled input's draws follow (``actors/sampling.py``): the input
    itself, so that it draws the same text in whatever batch it lands, and the
    request's seed where it gives one, so that another seed draws another text."""
    return json.dumps(given if seed is None else [given, seed])


def parse_request(body: bytes, accepts: Accepts) -> Asked:
    """The request's inputs, and its seed where the endpoint takes one.

    Raises:
        BadRequest: one line naming what is wrong (and where, for a bad input).
    """
    try:
        data = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise BadRequest(f"the body is not JSON ({e}); {USAGE}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body is {json_kind(data)}; {USAGE}")
    if "inputs" not in data:
        raise BadRequest(f"no 'inputs' field; {USAGE}")
    seed = data.get("seed")
    if seed is not None and not accepts.seed:
        raise BadRequest(
            "seed: this endpoint does not sample (started without --temperature)"
        )
    if seed is not None and (type(seed) is not int or seed < 0):
        raise BadRequest(f"seed must be a whole number >= 0, not {json.dumps(seed)}")
    unknown = sorted(set(data) - {"inputs", "seed"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; {USAGE}")
    texts = data["inputs"]
    if isinstance(texts, str):  # one text, as text-embeddings-inference takes it
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise BadRequest(
            f"inputs must be a string or a non-empty list of them; {USAGE}"
        )
    if len(texts) > MAX_INPUTS:
        raise BadRequest(
            f"{len(texts)} inputs; at most {MAX_INPUTS} per request "
            "(use `lmbatch infer` for datasets)"
        )
    inputs = [
        _input(i, text, accepts.pairs, accepts.single) for i, text in enumerate(texts)
    ]
    return Asked(inputs, seed)


def _input(i: int, given: object, pairs: bool, single: bool) -> Input:
    if isinstance(given, str) and single:
        return given
    if isinstance(given, str):
        raise BadRequest(
            f"inputs[{i}] is a string; score with a chat template takes "
            "[message, answer] pairs"
        )
    if pairs and isinstance(given, list):
        if len(given) == 2 and all(isinstance(t, str) for t in given):
            return (given[0], given[1])
        raise BadRequest(f"inputs[{i}] is a list, but not a [text, pair] of 2 strings")
    expected = "a string or a [text, pair] list" if pairs else "a string"
    raise BadRequest(f"inputs[{i}] is {json_kind(given)}, not {expected}")


def _jsonable(row: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()}
