"""The Python API of runtime.pipeline as a library user calls it: one pipeline shared by threads gives the
images a lone caller gets, wrong types are refused with one-line RequestErrors (only exact integers where
integers are meant), and a closed pipeline refuses every call."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import built_engines

from runtime.errors import FarError, RequestError
from runtime.pipeline import Pipeline

pytest.importorskip("torch")  # the engines are built with far_export


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return built_engines(tmp_path_factory, "masked", "shortcut")[1]


@pytest.fixture(scope="module")
def pipe(engines) -> Pipeline:
    return Pipeline.load(engines, threads=1)


def test_one_pipeline_shared_by_threads(pipe):
    """Four threads, each its own request, on one pipeline: every image equals the one a lone call makes."""
    requests = [([c, (c + 1) % 4, c], seed) for c, seed in zip(range(4), (0, 7, 11, 3))]
    expected = [pipe.generate(classes, head_steps=2, seed=seed) for classes, seed in requests]
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def work(i: int) -> None:
        classes, seed = requests[i]
        try:
            start.wait()
            got[i] = [pipe.generate(classes, head_steps=2, seed=seed) for _ in range(3)]
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, want in enumerate(expected):
        for images in got[i]:
            assert np.array_equal(images, want), (
                f"request {i}: max difference {np.abs(images.astype(int) - want).max()}"
            )


def test_generate_batches_interleaved_in_one_thread(pipe):
    """Two chunked requests consumed alternately: each chunk is complete before the other runs."""
    a = pipe.generate([0, 1, 2, 3], head_steps=2, seed=1, batch=1)
    b = pipe.generate([3, 2, 1, 0], head_steps=2, seed=2, batch=1)
    ia = pipe.generate_batches([0, 1, 2, 3], head_steps=2, seed=1, batch=1)
    ib = pipe.generate_batches([3, 2, 1, 0], head_steps=2, seed=2, batch=1)
    got_a, got_b = [], []
    for x, y in zip(ia, ib):
        got_a.append(x)
        got_b.append(y)
    assert np.array_equal(np.concatenate(got_a), a) and np.array_equal(np.concatenate(got_b), b)


def _refused(call, match: str) -> None:
    with pytest.raises(RequestError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes": [3.7]}, "class id must be an integer, got 3.7"),
        ({"classes": [True]}, "class id must be an integer, got True"),
        ({"classes": ["3"]}, "class id must be an integer"),
        ({"classes": ["a"]}, "class id must be an integer"),
        ({"classes": [float("nan")]}, "class id must be an integer"),
        ({"classes": "37"}, "classes must be a list of class ids"),
        ({"classes": {3: 1}}, "classes must be a list of class ids"),
        ({"classes": None}, "classes must be a list of class ids"),
        ({"classes": 3}, "classes must be a list of class ids"),
        ({"classes": (c for c in [1, 2])}, "classes must be a list of class ids"),
        ({"classes": np.array([[1, 2]])}, "classes must be a 1-d integer array"),
        ({"classes": np.array([1.0, 2.0])}, "classes must be a 1-d integer array"),
        ({"classes": np.array([True])}, "classes must be a 1-d integer array"),
        ({"classes": [1], "head_steps": 4.5}, "head_steps must be an integer, got 4.5"),
        ({"classes": [1], "head_steps": "4"}, "head_steps must be an integer"),
        ({"classes": [1], "head_steps": True}, "head_steps must be an integer"),
        ({"classes": [1], "seed": 1.5}, "seed must be an integer"),
        ({"classes": [1], "seed": "0"}, "seed must be an integer"),
        ({"classes": [1], "seed": None}, "seed must be an integer"),
        ({"classes": [1], "batch": 2.7}, "batch must be an integer"),
        ({"classes": [1], "num_iter": 2.5}, "num_iter must be an integer"),
        ({"classes": [1], "cfg_schedule": 5}, "cfg_schedule must be a name"),
        ({"classes": [1], "progress": 5}, "progress must be a function"),
    ],
)
def test_generate_refuses_wrong_types(pipe, kwargs, match):
    _refused(lambda: pipe.generate(**kwargs), match)


def test_numpy_integers_are_integers(pipe):
    want = pipe.generate([1, 2], head_steps=2, seed=5, batch=1)
    got = pipe.generate(
        np.array([1, 2], dtype=np.int32), head_steps=np.int64(2), seed=np.uint8(5), batch=np.int16(1)
    )
    assert np.array_equal(got, want)


def test_tokens_and_decode_refuse_wrong_input(pipe):
    m = pipe.model
    _refused(lambda: pipe.sample_tokens([1], None), "settings must be a Pipeline.settings")
    _refused(lambda: pipe.sample_tokens([1], pipe.settings(), first_index=-1), "first_index must be >= 0")
    _refused(lambda: pipe.decode(np.zeros((1, m.seq_len + 1, m.token_dim), np.float32)), "decode takes token")
    _refused(lambda: pipe.decode([[0.0]]), "decode takes token latents")
    _refused(lambda: pipe.decode(np.zeros((1, m.seq_len, m.token_dim), np.int64)), "float token latents")
    tokens = pipe.sample_tokens([1], pipe.settings(head_steps=2))
    assert pipe.decode(tokens).shape == (1, 3, m.img_size, m.img_size)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((None,), {}, "the engine directory must be a path"),
        (("{eng}",), {"threads": 0}, "threads must be >= 1"),
        (("{eng}",), {"threads": -3}, "threads must be >= 1"),
        (("{eng}",), {"threads": 2.5}, "threads must be an integer"),
        (("{eng}",), {"providers": 5}, "providers must be a name or a list"),
    ],
)
def test_load_refuses_wrong_types(engines, args, kwargs, match):
    args = tuple(str(engines) if a == "{eng}" else a for a in args)
    _refused(lambda: Pipeline.load(*args, **kwargs), match)


def test_call_from_its_own_progress_callback_is_refused(pipe):
    def progress(done: int, total: int) -> None:
        pipe.generate([0], head_steps=2)

    _refused(lambda: pipe.generate([1], head_steps=2, progress=progress), "called from inside its own call")
    assert pipe.generate([1], head_steps=2).shape[0] == 1  # and the pipeline still works


def test_closed_pipeline_refuses(engines):
    p = Pipeline.load(engines, threads=1)
    tokens = p.sample_tokens([1], p.settings(head_steps=2))
    p.close()
    p.close()  # twice is fine
    for call in (
        lambda: p.generate([1]),
        lambda: next(p.generate_batches([1])),
        lambda: p.sample_tokens([1], p.settings()),
        lambda: p.decode(tokens),
    ):
        with pytest.raises(FarError, match="this pipeline is closed"):
            call()
