"""``remote``: a reward model or judge behind an HTTP endpoint (align-anything's ``ppo_remote_rm``).

The RL module posts each rollout's samples, ``batch_size`` at a time, as JSON::

    POST <url>   {"prompts": [str, ...], "responses": [str, ...], "metas": [{...}, ...]}
    200 OK       {"scores": [float, ...]}        (or a bare JSON list of floats)

one score per sample, in order. A reward server can be a few lines of ``http.server``, a FastAPI app, or a
hosted judge behind a small adapter. From a config::

    reward_functions:
      - name: remote
        kwargs: {url: "http://127.0.0.1:8000/score", timeout: 30, retries: 3}

Each rank of a multi-process run posts its own samples. Connection failures, timeouts, HTTP 408, 429 and 5xx are retried with exponential back-off; any other status, a
body that is not JSON, a reply without one finite number per sample stop the run with an error that names the
URL, the status and the start of the body. Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from aa_lightning.rewards.registry import register_reward

__all__ = ["RemoteRewardError", "remote_reward"]

BODY_CHARS = 300  # how much of a reply body an error message shows
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """The reward endpoint failed or answered something that is not one score per sample."""


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for meta values: tensors and arrays as lists, anything else as its text."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)


def _shown(body: bytes | str) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    return text[:BODY_CHARS] + ("..." if len(text) > BODY_CHARS else "")


def parse_scores(body: bytes, expected: int, url: str, score_key: str = "scores") -> list[float]:
    """The scores of a 200 reply, or :class:`RemoteRewardError` saying what is wrong with it."""
    try:
        reply = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RemoteRewardError(
            f"reward server {url} replied with a body that is not JSON: {_shown(body)!r}"
        ) from None
    scores = reply.get(score_key) if isinstance(reply, dict) else reply
    if not isinstance(scores, list):
        raise RemoteRewardError(
            f"reward server {url} replied without a list of scores (expected {{{score_key!r}: [...]}} or a JSON "
            f"list): {_shown(body)!r}"
        )
    if len(scores) != expected:
        raise RemoteRewardError(
            f"reward server {url} returned {len(scores)} scores for {expected} samples: {_shown(body)!r}"
        )
    bad = [
        i
        for i, s in enumerate(scores)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
    ]
    if bad:
        raise RemoteRewardError(
            f"reward server {url} returned {len(bad)} scores that are not finite numbers (samples "
            f"{bad[:10]}, e.g. {scores[bad[0]]!r}): {_shown(body)!r}"
        )
    return [float(s) for s in scores]


def post_batch(
    url: str,
    payload: dict[str, Any],
    *,
    timeout: float,
    retries: int,
    backoff: float,
    headers: dict[str, str] | None = None,
) -> bytes:
    """POST ``payload`` as JSON; the body of the 200 reply. Transient failures are retried ``retries`` times,
    waiting ``backoff * 2**k`` seconds before retry ``k + 1``."""
    try:  # NaN / inf are no JSON: Python would write them as bare NaN, which servers reject or misread
        data = json.dumps(payload, default=_jsonable, allow_nan=False).encode("utf-8")
    except ValueError as error:
        raise RemoteRewardError(
            f"reward server {url}: the request holds NaN or infinity (in prompts/responses/metas), which JSON "
            f"cannot carry ({error}); clean the metas before scoring"
        ) from None
    request_headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=request_headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as error:
            body = error.read()
            last = f"HTTP {error.code} {error.reason}: {_shown(body)!r}"
            if error.code not in RETRIED_STATUSES:
                raise RemoteRewardError(f"reward server {url} answered {last}") from None
        except TimeoutError:
            last = f"no reply within timeout={timeout} s"
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                last = f"no reply within timeout={timeout} s"
            else:
                last = f"cannot connect ({error.reason})"
        except (ConnectionError, OSError) as error:  # a connection reset mid-reply
            last = f"connection failed ({error})"
        except http.client.HTTPException as error:  # a reply cut mid-body, a garbled status line (no OSError)
            last = f"broken reply ({type(error).__name__}: {error!r})"
    raise RemoteRewardError(f"reward server {url} failed {retries + 1} times; last: {last}")


@register_reward("remote", batched=True)
def remote_reward(
    prompts: Sequence[str],
    responses: Sequence[str],
    metas: Sequence[dict[str, Any]],
    url: str = "",
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    batch_size: int = 32,
    send_meta: bool = True,
    headers: dict[str, str] | None = None,
    token_env: str | None = None,
    score_key: str = "scores",
) -> list[float]:
    """A reward model or judge over HTTP: samples POSTed as JSON to ``url``, one score per sample back.

    Args:
        url: the endpoint (``http://`` or ``https://``).
        timeout: seconds to wait for the connection and for each read of the reply.
        retries: further attempts after a connection failure, a timeout, HTTP 408/429/5xx.
        backoff: seconds before the first retry; doubled for each next one.
        batch_size: samples per request (a rollout of more is sent in several requests, in order).
        send_meta: include each sample's meta dict (e.g. ``reference_answer``) under ``metas``.
        headers: extra HTTP headers. They are hyper-parameters (written to checkpoints and logs): put no
            secret here, use ``token_env``.
        token_env: name of an environment variable holding a token, sent as ``Authorization: Bearer <token>``.
        score_key: the reply's key holding the list of scores.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"reward 'remote' needs kwargs.url, an http:// or https:// endpoint (got {url!r}), e.g. "
            "{name: remote, kwargs: {url: 'http://127.0.0.1:8000/score'}}"
        )
    if batch_size < 1 or retries < 0 or timeout <= 0:
        raise ValueError(
            f"reward 'remote': batch_size must be >= 1, retries >= 0 and timeout > 0 "
            f"(got batch_size={batch_size}, retries={retries}, timeout={timeout})"
        )
    headers = dict(headers or {})
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise ValueError(
                f"reward 'remote': token_env {token_env!r} names an environment variable that is not set"
            )
        headers["Authorization"] = f"Bearer {token}"
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        payload: dict[str, Any] = {
            "prompts": list(prompts[start:end]),
            "responses": list(responses[start:end]),
        }
        if send_meta:
            payload["metas"] = list(metas[start:end])
        body = post_batch(url, payload, timeout=timeout, retries=retries, backoff=backoff, headers=headers)
        scores += parse_scores(body, len(payload["prompts"]), url, score_key)
    return scores
