"""The ``remote`` reward against a real HTTP server on 127.0.0.1 (``http.server`` in a thread, a random port):
batching, a retried 500, a timeout, malformed replies, and a short GRPO run from the shipped YAML."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from aa_lightning.rewards import RemoteRewardError, WeightedRewards, get_reward

Reply = tuple[int, bytes, float]  # status, body, seconds to wait before answering


def length_scores(payload: dict[str, Any]) -> Reply:
    """The reference reply: each response's length in characters plus the meta's ``bonus``."""
    scores = [len(r) + m.get("bonus", 0) for r, m in zip(payload["responses"], payload["metas"])]
    return 200, json.dumps({"scores": scores}).encode(), 0.0


class RewardServer:
    """A local endpoint whose replies come from ``script`` (one function per request, the last one repeats)."""

    def __init__(self) -> None:
        self.script: list[Callable[[dict[str, Any]], Reply]] = [length_scores]
        self.requests: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.cut = 0  # the first ``cut`` replies stop halfway through their body and the connection closes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(payload)
                server.authorization.append(self.headers.get("Authorization"))
                reply = server.script[min(len(server.requests), len(server.script)) - 1]
                status, body, delay = reply(payload)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if len(server.requests) <= server.cut:
                        self.wfile.write(body[: len(body) // 2])
                        self.close_connection = True
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[RewardServer]:
    s = RewardServer()
    yield s
    s.close()


def call(url: str, n: int = 5, **kwargs: Any) -> list[float]:
    prompts = [f"prompt {i}" for i in range(n)]
    responses = ["x" * (i + 1) for i in range(n)]
    metas = [{"bonus": 10 * i} for i in range(n)]
    return get_reward("remote")(prompts, responses, metas, url=url, **kwargs)


def test_scores_come_back_in_order_in_batches(server: RewardServer) -> None:
    assert call(server.url, batch_size=2) == [1.0, 12.0, 23.0, 34.0, 45.0]
    assert [len(r["prompts"]) for r in server.requests] == [2, 2, 1]  # 5 samples, 2 a request
    assert server.requests[0] == {"prompts": ["prompt 0", "prompt 1"], "responses": ["x", "xx"],
                                  "metas": [{"bonus": 0}, {"bonus": 10}]}  # fmt: skip
    # through the weighted sum an RL module uses: the remote term is one more named part
    rewards = WeightedRewards([{"name": "remote", "weight": 0.5, "kwargs": {"url": server.url}}])
    total, parts = rewards(["p", "q"], ["abc", "a"], [{}, {}])
    assert total.tolist() == [1.5, 0.5] and parts["remote"].tolist() == [3.0, 1.0]


def test_a_transient_500_is_retried_after_a_backoff(server: RewardServer) -> None:
    server.script = [lambda payload: (500, b"overloaded", 0.0), length_scores]
    start = time.perf_counter()
    assert call(server.url, n=2, backoff=0.2) == [1.0, 12.0]
    assert len(server.requests) == 2 and time.perf_counter() - start >= 0.2


def test_a_server_that_keeps_failing_names_url_status_and_body(server: RewardServer) -> None:
    server.script = [lambda payload: (503, b"model is loading", 0.0)]
    with pytest.raises(RemoteRewardError, match=rf"{server.url} failed 3 times.*HTTP 503.*model is loading"):
        call(server.url, retries=2, backoff=0.01)
    assert len(server.requests) == 3


def test_a_reply_cut_mid_body_is_retried_then_named(server: RewardServer) -> None:
    """http.client.IncompleteRead is no OSError: it is retried, and named once the retries are spent."""
    server.cut = 1
    assert call(server.url, n=2, backoff=0.01) == [1.0, 12.0]
    assert len(server.requests) == 2
    server.cut = 99
    with pytest.raises(RemoteRewardError, match=r"failed 2 times.*broken reply \(IncompleteRead"):
        call(server.url, n=2, retries=1, backoff=0.01)


def test_nan_in_metas_is_a_clear_error_not_invalid_json(server: RewardServer) -> None:
    with pytest.raises(RemoteRewardError, match=r"NaN or infinity"):
        get_reward("remote")(["p"], ["r"], [{"bonus": float("nan")}], url=server.url)
    assert server.requests == []  # nothing was sent


def test_a_client_error_is_not_retried(server: RewardServer) -> None:
    server.script = [lambda payload: (400, b'{"detail": "prompts missing"}', 0.0)]
    with pytest.raises(RemoteRewardError, match=r"answered HTTP 400.*prompts missing"):
        call(server.url, backoff=0.01)
    assert len(server.requests) == 1


def test_a_slow_server_times_out(server: RewardServer) -> None:
    server.script = [lambda payload: (*length_scores(payload)[:2], 2.0)]
    start = time.perf_counter()
    with pytest.raises(
        RemoteRewardError, match=rf"{server.url} failed 2 times.*no reply within timeout=0.3 s"
    ):
        call(server.url, n=1, timeout=0.3, retries=1, backoff=0.01)
    assert time.perf_counter() - start < 1.5  # two attempts of 0.3 s, not two of 2 s


def test_nobody_listening_is_a_connection_error() -> None:
    probe = RewardServer()  # take a free port, then close it
    url = probe.url
    probe.close()
    with pytest.raises(RemoteRewardError, match=rf"{url} failed 1 times.*cannot connect"):
        call(url, retries=0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>oops</html>", r"not JSON: '<html>oops</html>'"),
        (b'{"result": [1, 2]}', r"without a list of scores"),
        (b'{"scores": [1.0]}', r"returned 1 scores for 2 samples"),
        (b'{"scores": [1.0, "high"]}', r"not finite numbers \(samples \[1\], e.g. 'high'\)"),
        (b'{"scores": [NaN, 1.0]}', r"not finite numbers \(samples \[0\]"),
    ],
)
def test_malformed_replies_are_clear_errors(server: RewardServer, body: bytes, message: str) -> None:
    server.script = [lambda payload: (200, body, 0.0)]
    with pytest.raises(RemoteRewardError, match=rf"reward server {server.url} .*{message}"):
        call(server.url, n=2)
    assert len(server.requests) == 1  # a malformed reply is a protocol error, not retried


def test_a_token_from_the_environment_is_sent_as_a_bearer_header(
    server: RewardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_JUDGE_TOKEN", "s3cret")
    assert call(server.url, n=1, token_env="MY_JUDGE_TOKEN") == [1.0]
    assert server.authorization == ["Bearer s3cret"]
    monkeypatch.delenv("MY_JUDGE_TOKEN")
    with pytest.raises(ValueError, match="'MY_JUDGE_TOKEN' names an environment variable that is not set"):
        call(server.url, n=1, token_env="MY_JUDGE_TOKEN")


def test_a_bare_list_reply_and_a_missing_url() -> None:
    s = RewardServer()
    try:
        s.script = [lambda payload: (200, json.dumps([0.5] * len(payload["prompts"])).encode(), 0.0)]
        assert call(s.url, n=3, send_meta=False) == [0.5, 0.5, 0.5]
        assert "metas" not in s.requests[0]
    finally:
        s.close()
    with pytest.raises(ValueError, match="needs kwargs.url"):
        call("")


def test_grpo_trains_on_the_remote_reward_from_the_shipped_config(
    server: RewardServer, repo_path: Callable[..., str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``configs/tiny/grpo_remote_t2t.yaml`` with its url pointed at the test server: the scores the server
    computed are the rollout scores GRPO logs."""
    from aa_lightning.cli import build_cli

    monkeypatch.chdir(repo_path())
    with open(repo_path("configs", "tiny", "grpo_remote_t2t.yaml")) as f:
        config = yaml.safe_load(f)
    (spec,) = config["model"]["init_args"]["reward_functions"]
    assert spec["name"] == "remote"
    spec["kwargs"]["url"] = server.url
    path = tmp_path / "grpo_remote.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(
        [
            "fit",
            "--config",
            str(path),
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
        ]
    )
    assert cli.trainer.global_step == 2
    assert len(server.requests) >= 2  # one request (4 prompts x 4 samples) per rollout
    sent = [len(r) for req in server.requests for r in req["responses"]]
    assert len(sent) == 2 * 4 * 4
    last = [len(r) for r in server.requests[-1]["responses"]]  # the server's scores of the last rollout
    logged = float(cli.trainer.callback_metrics["rollout/score"])
    assert logged == pytest.approx(sum(last) / len(last), rel=1e-6), (logged, last)
