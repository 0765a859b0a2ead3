"""The error table of docs/api.md, row by row: every (status, code) it lists is what the service
answers, for each wire format the row applies to (JSON, .npy, .npz), with the job and field the
docs promise (the offending job's index, 0 for a single-job body; ``null`` for errors that concern
no job). In process, through ``httpx.ASGITransport``.

A row without a case here fails ``test_every_row_has_a_case``, and a case whose (status, code) is
not in the table fails ``test_every_case_is_in_the_table``: the table and the service cannot drift
apart unnoticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from helpers import make_settings, npy, npz

import surrogate_core as core
from service.app import create_app

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
TOKEN = "table-token-0123456789"
JSON, NPY, NPZ = "application/json", "application/x-npy", "application/x-npz"
# small limits, so that the limit cases stay small
LIMITS = {"max_elements": 1000, "max_body_bytes": 16384, "max_jobs": 4, "max_rank": 8}


def error_table() -> list[tuple[int, tuple[str, ...], str]]:
    """``(status, codes, when)`` for every row of the table under ``## Errors`` in docs/api.md."""
    text = DOC.read_text()
    section = text.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        codes = tuple(re.findall(r"`([a-z_]+)`", cells[1]))
        assert codes, line
        rows.append((int(cells[0]), codes, cells[2]))
    return rows


def js(doc: Any) -> bytes:
    return orjson.dumps(doc)


@dataclass
class Case:
    """One request that must be answered with ``status`` and ``code``, ``job`` and ``field``."""

    status: int
    code: str
    fmt: str  # "json", "npy", "npz", or "-" for requests without a body
    body: bytes | None = None
    path: str = "/v1/grad"
    method: str = "POST"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    job: int | None = None
    field: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: what to do to the runtime first (a failing or slow engine), given the runtime and monkeypatch
    setup: Callable[[Any, Any], None] | None = None
    #: how to send it, if not one plain request: ``async (client, case) -> httpx.Response``
    send: Callable[[httpx.AsyncClient, Case], Any] | None = None
    retry_after: bool = False
    #: a part of the message that must be there
    fragment: str = ""

    @property
    def id(self) -> str:
        return f"{self.status}-{self.code}-{self.fmt}-{self.label}"

    label: str = ""


CTYPE = {"json": JSON, "npy": NPY, "npz": NPZ}
X = np.array([-1.0, 0.0, 0.5], np.float32)


def _slow(seconds: float) -> Callable[[Any, Any], None]:
    def setup(rt: Any, monkeypatch: Any) -> None:
        real = rt.engine.run

        def run(jobs: Any) -> Any:
            time.sleep(seconds)
            return real(jobs)

        monkeypatch.setattr(rt.engine, "run", run)

    return setup


def _failing(exc: BaseException) -> Callable[[Any, Any], None]:
    def setup(rt: Any, monkeypatch: Any) -> None:
        def run(jobs: Any) -> Any:
            raise exc

        monkeypatch.setattr(rt.engine, "run", run)

    return setup


def _internal(rt: Any, monkeypatch: Any) -> None:
    import service.protocols.v1.codec as v1

    def boom(*args: Any, **kw: Any) -> None:
        raise KeyError("internal detail")

    monkeypatch.setattr(v1, "check_finite", boom)


async def _slow_upload(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    body = case.body or b""

    async def chunks():  # half the body, then a pause past the request time limit
        yield body[: len(body) // 2]
        await asyncio.sleep(0.8)
        yield body[len(body) // 2:]

    return await client.post(case.path, content=chunks(), headers={"content-type": CTYPE[case.fmt]})


async def _one_of_two(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    """Two requests at once with room for one: the refused one."""
    rs = await asyncio.gather(*(_plain(client, case) for _ in range(2)))
    refused = [r for r in rs if r.status_code != 200]
    assert len(refused) == 1, [r.status_code for r in rs]
    return refused[0]


async def _plain(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.body is not None and case.fmt in CTYPE:
        headers.setdefault("content-type", CTYPE[case.fmt])
    return await client.request(case.method, case.path, content=case.body, headers=headers)


def _too_deep() -> Any:
    v: Any = 1.0
    for _ in range(9):
        v = [v]
    return v


def cases() -> list[Case]:
    one = np.ones(1, np.float32)
    deep = np.zeros((1,) * 9, np.float32)
    over = np.zeros(1001, np.float32)
    big = b"\x00" * 17000
    c = [
        # 400
        Case(400, "bad_request", "json", b'{"x": [1, 2', label="syntax"),
        Case(400, "bad_request", "json", b'{"x": [NaN]}', label="nan"),
        Case(400, "bad_request", "json", b"", label="empty"),
        Case(400, "bad_request", "json", npy(X), label="npy-as-json", fragment="'content-type: application/x-npy'"),
        Case(400, "bad_request", "json", npz(x=X), label="npz-as-json", fragment="'content-type: application/x-npz'"),
        Case(400, "bad_request", "json", b'{"x": [1, -Infinity]}', label="infinity",
             fragment="'-Infinity' at line 1 column 11: JSON has no NaN or Infinity; send such values in a .npy"),
        # 401
        *(Case(401, "unauthorized", f, body, settings={"api_token": TOKEN}, label="no-token")
          for f, body in (("json", js({"x": [1.0]})), ("npy", npy(X)), ("npz", npz(x=X)))),
        # 404
        Case(404, "not_found", "-", None, path="/v1/nope", method="GET", label="route"),
        Case(404, "unknown_surrogate", "-", None, path="/v1/surrogates/nope", method="GET", field="name",
             label="metadata"),
        Case(404, "unknown_surrogate", "-", None, path="/v1/surrogates/Sigmoid", method="GET", field="name",
             label="braintools-name", fragment="unknown surrogate 'Sigmoid'; did you mean 'sigmoid'?"),
        Case(404, "unknown_surrogate", "-", None, path="/v1/surrogates/sigmod", method="GET", field="name",
             label="misspelt", fragment="did you mean 'sigmoid'?"),
        Case(404, "not_found", "-", None, path="/v1/surrogates/sigmoid/grad", method="GET", label="below-metadata"),
        # 405
        Case(405, "method_not_allowed", "-", None, method="GET", label="get-compute"),
        # 406
        Case(406, "not_acceptable", "json", js([{"x": [1.0]}, {"x": [2.0]}]), headers={"accept": NPY}, label="list"),
        # 408: the body arrives too slowly
        *(Case(408, "request_timeout", f, body, settings={"request_timeout": 0.2}, send=_slow_upload, label="upload")
          for f, body in (("json", js({"x": [1.0] * 50})), ("npy", npy(X)), ("npz", npz(x=X)))),
        # 413
        Case(413, "body_too_large", "json", b'{"x": [' + b"0," * 8200 + b"0]}", field="body", label="body"),
        Case(413, "body_too_large", "npy", npy(np.zeros(4100, np.float32)), field="body", label="body"),
        Case(413, "body_too_large", "npz", big, field="body", label="body"),
        # 415
        Case(415, "unsupported_media_type", "-", b'{"x": [1]}', headers={"content-type": "text/plain"},
             label="text"),
        # 422 invalid_type
        Case(422, "invalid_type", "json", js({"x": [1.0, "2"]}), job=0, field="x", label="string"),
        Case(422, "invalid_type", "json", js({"x": [[1.0], [2.0, 3.0]]}), job=0, field="x", label="ragged"),
        Case(422, "invalid_type", "json", js({"x": [1.0], "alpha": True}), job=0, field="alpha", label="boolean"),
        Case(422, "invalid_type", "json", js({"x": [1.0, None]}), job=0, field="x", label="null"),
        Case(422, "invalid_type", "json", js({"x": {"a": 1}}), job=0, field="x", label="object"),
        Case(422, "invalid_type", "json", js([{"x": [1.0]}, 5]), job=1, field=None, label="list-item"),
        Case(422, "invalid_type", "json", b"42", label="number-body"),
        Case(422, "invalid_type", "json", b'"x"', label="string-body"),
        Case(422, "invalid_type", "npy", npy(np.arange(3)), job=0, field="x", label="int-dtype"),
        Case(422, "invalid_type", "npy", npy(X), path="/v1/grad?alpha=two", job=0, field="alpha", label="query"),
        Case(422, "invalid_type", "npy", npy(X), path="/v1/grad?alpha=%EF%BC%91", job=0, field="alpha",
             label="fullwidth-digit"),
        Case(422, "invalid_type", "npz", npz(x=X, alpha=np.array([1, 2])), job=0, field="alpha", label="int-dtype"),
        # 422 invalid_value
        Case(422, "invalid_value", "json", js({"x": [0.5], "alpha": -1}), job=0, field="alpha", label="alpha"),
        Case(422, "invalid_value", "json", js([{"x": [0.5]}, {"x": [0.5], "alpha": 0}]), job=1, field="alpha",
             label="second-job"),
        Case(422, "invalid_value", "npy", npy(X), path="/v1/grad?alpha=-1", job=0, field="alpha", label="alpha"),
        Case(422, "invalid_value", "npz", npz(x=X, alpha=-one), job=0, field="alpha", label="alpha"),
        # 422 missing_field, unknown_field
        Case(422, "missing_field", "json", js({"alpha": 1.0}), job=0, field="x", label="no-x"),
        Case(422, "missing_field", "npz", npz(alpha=one), job=0, field="x", label="no-x"),
        Case(422, "unknown_field", "json", js({"x": [1.0], "alpah": 1.0}), job=0, field="alpah", label="typo"),
        Case(422, "unknown_field", "json", js({"x": [1.0], "cotangent": 1.0}), path="/v1/spike", job=0,
             field="cotangent", label="cotangent"),
        Case(422, "unknown_field", "npy", npy(X), path="/v1/grad?alpah=1", job=0, field="alpah", label="typo"),
        Case(422, "unknown_field", "npy", npy(X), path="/v1/grad?x=1", job=0, field="x", label="x-in-query",
             fragment="goes in the body"),
        Case(422, "unknown_field", "npz", npz(x=X, alpah=one), job=0, field="alpah", label="typo"),
        # 422 unknown_surrogate, unknown_dtype
        Case(422, "unknown_surrogate", "json", js({"x": [1.0], "surrogate": "nope"}), job=0, field="surrogate",
             label="name"),
        Case(422, "unknown_surrogate", "json", js({"x": [1.0], "surrogate": "PiecewiseQuadratic"}), job=0,
             field="surrogate", label="braintools-name", fragment="did you mean 'piecewise_quadratic'?"),
        Case(422, "unknown_surrogate", "npy", npy(X), path="/v1/grad?surrogate=nope", job=0, field="surrogate",
             label="name"),
        Case(422, "unknown_surrogate", "npy", npy(X), path="/v1/grad?surrogate=sigmod", job=0, field="surrogate",
             label="misspelt", fragment="did you mean 'sigmoid'?"),
        Case(422, "unknown_surrogate", "npz", npz(x=X), path="/v1/grad?surrogate=nope", job=0, field="surrogate",
             label="name"),
        Case(422, "unknown_dtype", "json", js({"x": [1.0], "dtype": "float8"}), job=0, field="dtype", label="name"),
        Case(422, "unknown_dtype", "npy", npy(X), path="/v1/grad?dtype=float8", job=0, field="dtype", label="name"),
        Case(422, "unknown_dtype", "npz", npz(x=X), path="/v1/grad?dtype=float8", job=0, field="dtype", label="name"),
        # 422 shape_mismatch
        Case(422, "shape_mismatch", "json", js({"x": [1.0, 2.0], "alpha": [1.0, 2.0, 3.0]}), job=0, field="alpha",
             label="alpha"),
        Case(422, "shape_mismatch", "npz", npz(x=X, alpha=np.ones(2, np.float32)), job=0, field="alpha",
             label="alpha"),
        # 422 not_representable
        Case(422, "not_representable", "json", js({"x": [70000.0], "dtype": "float16"}), job=0, field="x",
             label="float16"),
        Case(422, "not_representable", "json", b'{"x": [1e400]}', job=0, field="x", label="past-float64"),
        Case(422, "not_representable", "json", b'[{"x": [1]}, {"x": [1], "alpha": -1e400}]', job=1, field="alpha",
             label="past-float64-second-job"),
        Case(422, "not_representable", "npy", npy(np.array([70000.0], np.float32)), path="/v1/grad?dtype=float16",
             job=0, field="x", label="float16"),
        Case(422, "not_representable", "npz", npz(x=np.array([70000.0], np.float32)), path="/v1/grad?dtype=float16",
             job=0, field="x", label="float16"),
        # 422 too_large: rank, elements, jobs, .npz members
        Case(422, "too_large", "json", js({"x": _too_deep()}), job=0, field="x", label="rank"),
        Case(422, "too_large", "npy", npy(deep), job=0, field="x", label="rank"),
        Case(422, "too_large", "npz", npz(x=deep), job=0, field="x", label="rank"),
        Case(422, "too_large", "json", js({"x": [0.0] * 1001}), job=0, field="x", label="elements"),
        Case(422, "too_large", "json", js({"x": [0.0] * 100, "alpha": [[1.0]] * 11}), job=0, field="x",
             label="broadcast"),
        Case(422, "too_large", "npy", npy(over), job=0, field="x", label="elements"),
        Case(422, "too_large", "npz", npz(x=over), job=0, field="x", label="elements"),
        Case(422, "too_large", "json", js([{"x": [0.0]}] * 5), label="jobs"),
        Case(422, "too_large", "npz", npz(x=X, **{f"m{i}": one for i in range(16)}), job=0,
             label="members"),
        # 422 empty_batch, duplicate_key
        Case(422, "empty_batch", "json", b"[]", label="empty-list"),
        Case(422, "duplicate_key", "json", b'{"x": [1], "x": [2]}', job=0, field="x", label="single"),
        Case(422, "duplicate_key", "json", b'[{"x": [1]}, {"x": [1], "alpha": 1, "alpha": 2}]', job=1,
             field="alpha", label="second-job"),
        Case(422, "duplicate_key", "json", b'{"x": [1], "\\u0078": [2]}', job=0, field="x", label="escaped"),
        # 422 invalid_binary
        Case(422, "invalid_binary", "npy", npy(X)[:-2], job=0, field="x", label="truncated"),
        Case(422, "invalid_binary", "npy", b"not an npy file at all", job=0, field="x", label="garbage"),
        Case(422, "invalid_binary", "npz", b"PK not a zip", job=0, label="garbage"),
        # 500
        Case(500, "internal_error", "json", js({"x": [1.0]}), setup=_internal, label="bug"),
        Case(500, "internal_error", "npy", npy(X), headers={"accept": NPY}, setup=_internal, label="bug"),
        *(Case(500, "device_error", f, body, setup=_failing(RuntimeError("XLA exploded")), label="device")
          for f, body in (("json", js({"x": [1.0]})), ("npy", npy(X)), ("npz", npz(x=X)))),
        # 503
        *(Case(503, "overloaded", f, body, settings={"max_concurrent": 1, "offload_elements": 0},
               setup=_slow(0.3), send=_one_of_two, retry_after=True, label="concurrency")
          for f, body in (("json", js({"x": [1.0]})), ("npy", npy(X)), ("npz", npz(x=X)))),
        *(Case(503, "timeout", f, body, settings={"request_timeout": 0.2, "offload_elements": 0},
               setup=_slow(0.5), retry_after=True, label="slow-device")
          for f, body in (("json", js({"x": [1.0]})), ("npy", npy(X)), ("npz", npz(x=X)))),
        *(Case(503, "device_out_of_memory", f, body, setup=_failing(MemoryError()), retry_after=True, label="oom")
          for f, body in (("json", js({"x": [1.0]})), ("npy", npy(X)), ("npz", npz(x=X)))),
    ]
    return c


#: Rows answered below the application, by the HTTP protocol (service/server/httpproto.py): they need a
#: real server and are checked end to end, in the files named.
PROTOCOL_ROWS = {
    (431, "headers_too_large"): "tests/e2e/test_headers_e2e.py",
    (503, "shutting_down"): "tests/e2e/test_shutdown_e2e.py",
}

CASES = cases()


def test_the_table_is_found_and_parsed():
    rows = error_table()
    assert len(rows) >= 20
    assert (422, ("too_large",)) in [(s, c) for s, c, _ in rows]


def test_every_row_has_a_case():
    covered = {(c.status, c.code) for c in CASES} | set(PROTOCOL_ROWS)
    missing = [(status, code) for status, codes, _ in error_table() for code in codes if (status, code) not in covered]
    assert not missing, f"rows of the error table in docs/api.md without a case here: {missing}"


def test_every_case_is_in_the_table():
    listed = {(status, code) for status, codes, _ in error_table() for code in codes}
    extra = sorted({(c.status, c.code) for c in CASES} - listed)
    assert not extra, f"answers the error table of docs/api.md does not list: {extra}"


def test_the_protocol_rows_are_tested_end_to_end():
    root = Path(__file__).resolve().parents[2]
    for (status, code), path in PROTOCOL_ROWS.items():
        text = (root / path).read_text()
        assert str(status) in text, (status, path)
        assert code in text, (code, path)


def _job_and_field_rule() -> str:
    """The paragraph of docs/api.md that says what ``job`` and ``field`` hold."""
    section = DOC.read_text().split("\n## Errors\n", 1)[1]
    return " ".join(next(p for p in section.split("\n\n") if p.startswith("`job`")).split())


def test_job_and_field_are_what_the_docs_say():
    """``job`` only on a 422; a ``field`` on any other status is one the docs name for that status
    (and only where the service answers it)."""
    rule = _job_and_field_rule()
    assert "`job` is the index of the offending job" in rule and "every status but 422" in rule
    assert all(c.job is None for c in CASES if c.status != 422)
    fields = {(c.status, c.field) for c in CASES if c.status != 422 and c.field is not None}
    assert fields >= {(413, "body"), (404, "name")}
    for status, field in fields:
        assert re.search(rf'`"{field}"` for (a|the) {status}\b', rule), (status, field, rule)
    documented = set(re.findall(r'`"([a-z_]+)"` for (?:a|the) (\d{3})\b', rule))
    assert documented == {(field, str(status)) for status, field in fields}
    # and the 404 without a field: no such route
    assert any(c.status == 404 and c.field is None for c in CASES)


def test_every_format_of_a_binary_row_is_covered():
    """A row that applies to binary bodies has a case for each of .npy and .npz where both can
    produce it (.npy cannot be missing a member, have a broadcast mismatch or too many members)."""
    by_row: dict[tuple[int, str], set[str]] = {}
    for c in CASES:
        by_row.setdefault((c.status, c.code), set()).add(c.fmt)
    npz_only = {(422, "missing_field"), (422, "shape_mismatch")}
    json_only = {(400, "bad_request"), (406, "not_acceptable"), (422, "empty_batch"), (422, "duplicate_key")}
    for row, fmts in by_row.items():
        if "-" in fmts or row in json_only:
            continue
        if row in npz_only:
            assert {"json", "npz"} <= fmts, row
        elif row == (422, "invalid_binary"):
            assert {"npy", "npz"} <= fmts, row
        elif row == (500, "internal_error"):
            assert {"json", "npy"} <= fmts, row
        else:
            assert {"json", "npy", "npz"} <= fmts, (row, fmts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_row(case: Case, monkeypatch):
    app = create_app(make_settings(**{**LIMITS, **case.settings}))
    rt = app.state.runtime
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            if "request_timeout" in case.settings:  # compile first: the short time limit is not for compiling
                rt.engine.run([core.make_job("grad", X, surrogate=core.DEFAULT_SURROGATE, dtype="float32")])
            if case.setup is not None:
                case.setup(rt, monkeypatch)
            r = await (case.send or _plain)(client, case)
            assert r.status_code == case.status, r.text
            assert r.headers["content-type"] == JSON
            err = r.json()["error"]
            assert (err["status"], err["code"]) == (case.status, case.code), err
            assert (err["job"], err["field"]) == (case.job, case.field), err
            assert err["message"]
            assert case.fragment in err["message"]
            if case.retry_after:
                assert r.headers["retry-after"] == "1"
            if case.status == 401:
                assert r.headers["www-authenticate"] == "Bearer"
            assert "internal detail" not in r.text  # no internals leak
            assert "XLA exploded" not in r.text
            # the service goes on answering correctly
            monkeypatch.undo()
            await asyncio.sleep(0.6 if case.code in ("timeout", "request_timeout", "overloaded") else 0)
            headers = {"content-type": JSON}
            if "api_token" in case.settings:
                headers["authorization"] = f"Bearer {TOKEN}"
            ok = await client.post("/v1/grad", content=js({"x": [-2.0, 0.0, 0.5]}), headers=headers)
            assert ok.status_code == 200, ok.text
            assert ok.json()["grad"] == [0.0, 1.0, 0.5]
