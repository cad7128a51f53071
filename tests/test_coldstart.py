import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from parallel_r1.answers import is_correct
from parallel_r1.coldstart import (
    TeacherConfig,
    TeacherError,
    YieldReport,
    api_base,
    generate,
    rejected_path,
    rejection_reason,
)
from parallel_r1.data import Problem
from parallel_r1.format import validate

GOOD = (
    "Add them.\n<Parallel>\n<Path>\n{a} + {b} = {c}\n</Path>\n<Path>\n{b} + {a} = {c}\n</Path>\n</Parallel>\n"
    "<Summary>\nBoth give {c}.\n</Summary>\nFinal Answer: {c}"
)


class Stub:
    """A fake teacher. `script[question]` is the list of replies for that question, one per request (the last
    one repeats): a string is a 200 reply with that content; ("status", code), ("sleep", seconds, text)."""

    def __init__(self, script: dict, delay_s: float = 0.0):
        self.script = script
        self.delay_s = delay_s
        self.requests: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def reply(self, question: str):
        with self.lock:
            n = self.requests[question]
            self.requests[question] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            replies = self.script[question]
            action = replies[min(n, len(replies) - 1)]
            if isinstance(action, tuple) and action[0] == "sleep":
                time.sleep(action[1])
                action = action[2]
            return action
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture()
def serve():
    servers = []

    def start(stub: Stub) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["model"] == "teacher"
                question = body["messages"][-1]["content"].rsplit("Problem: ", 1)[1].strip()
                action = stub.reply(question)
                if isinstance(action, tuple):
                    self.send_error(action[1])
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.handle_error = lambda *args: None  # a client that timed out closed the socket: expected
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def made_up_problems(n: int) -> list[tuple[Problem, str]]:
    out = []
    for i in range(n):
        a, b = 10 + i, 3 * i + 1
        out.append((Problem(f"What is {a} + {b}?", str(a + b), "toy", f"toy/{i}"), GOOD.format(a=a, b=b, c=a + b)))
    return out


def real_problems(shared_data: Path, n: int) -> list[tuple[Problem, str]]:
    out = []
    for i, line in enumerate((shared_data / "parallel_gsm8k_sample.jsonl").read_text().splitlines()):
        row = json.loads(line)
        # Keep teacher outputs that pass both checks, so that every rejection below is one we caused.
        if (
            not validate(row["response"])
            and is_correct(row["response"], row["answer"])
            and "<Parallel>" in row["response"]
        ):
            out.append((Problem(row["question"].strip(), row["answer"], "gsm8k", f"gsm8k/{i}"), row["response"]))
        if len(out) == n:
            break
    return out


def test_rejection_reason():
    good = GOOD.format(a=2, b=3, c=5)
    assert rejection_reason(good, "5") is None
    assert rejection_reason(good, "6") == "wrong_answer"
    assert rejection_reason(good.replace("</Path>", "", 1), "5") == "format:unclosed_path"
    assert rejection_reason(good.replace("</Summary>", ""), "5") == "format:unclosed_summary"
    assert rejection_reason("2 + 3 = 5. Final Answer: 5", "5") == "no_block"
    assert rejection_reason("2 + 3 = 5. Final Answer: 5", "5", require_block=False) is None
    assert rejection_reason(good.replace("Final Answer: 5", "so five"), "5") == "no_answer"


def test_api_base():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("http://h/v1/chat/completions") == "http://h/v1"


def _run_mixed(pairs, serve, tmp_path):
    """Serve `pairs` with damage done to some of them; check what is kept, rejected and retried."""
    problems = [p for p, _ in pairs]
    script = {p.question: [response] for p, response in pairs}
    q = [p.question for p in problems]
    wrong = pairs[0][1].rsplit("Final Answer:", 1)[0] + "Final Answer: 123456789"
    script[q[0]] = [wrong]
    script[q[1]] = [pairs[1][1].replace("</Path>", "", 1)]  # malformed
    script[q[2]] = [
        pairs[2][1]
        .replace("<Parallel>", "")
        .replace("</Parallel>", "")
        .replace("<Path>", "")
        .replace("</Path>", "")
        .replace("<Summary>", "")
        .replace("</Summary>", "")
    ]  # no block
    script[q[3]] = [("status", 500)]  # fails every time
    script[q[4]] = [("status", 503), ("status", 500), pairs[4][1]]  # recovers on the third try
    script[q[5]] = [("sleep", 1.5, pairs[5][1]), pairs[5][1]]  # the first request times out
    script[q[6]] = [("status", 400)]  # not worth retrying
    stub = Stub(script, delay_s=0.05)
    cfg = TeacherConfig(serve(stub), "teacher", timeout_s=0.75, retries=3, concurrency=3)
    out = tmp_path / "kept.jsonl"
    report = generate(problems, cfg, out)

    expected_kept = {p.id for p in problems} - {problems[i].id for i in (0, 1, 2, 3, 6)}
    assert report.tried == len(problems) and report.kept == len(expected_kept)
    assert report.rejected == Counter(
        {"wrong_answer": 1, "format:unclosed_path": 1, "no_block": 1, "request_failed": 2}
    )
    assert report.yield_rate == pytest.approx(len(expected_kept) / len(problems))
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in kept} == expected_kept and len(kept) == len(expected_kept)
    for r in kept:
        assert validate(r["response"]) == [] and is_correct(r["response"], r["answer"])
        assert r["prompt"].rstrip().endswith(r["question"]) and r["teacher"] == "teacher"
    assert stub.requests[q[3]] == 4  # the first try and three retries
    assert stub.requests[q[4]] == 3
    assert stub.requests[q[5]] == 2
    assert stub.requests[q[6]] == 1
    assert stub.max_in_flight <= 3 + 1  # the server still sleeps on the request that timed out
    rejected = [json.loads(line) for line in rejected_path(out).read_text().splitlines()]
    assert sorted(r["id"] for r in rejected) == sorted(problems[i].id for i in (0, 1, 2))

    # A second run tries only what failed on the way (the two request failures), nothing twice.
    script[q[3]] = [pairs[3][1]]
    again = generate(problems, cfg, out)
    assert (again.tried, again.kept, again.skipped) == (2, 1, len(problems) - 2)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(expected_kept) + 1


def test_yield_retries_and_rejections_on_made_up_outputs(serve, tmp_path):
    _run_mixed(made_up_problems(12), serve, tmp_path)


def test_yield_retries_and_rejections_on_real_teacher_outputs(shared_data, serve, tmp_path):
    _run_mixed(real_problems(shared_data, 16), serve, tmp_path)


def test_concurrency_is_bounded_and_used(serve, tmp_path):
    pairs = made_up_problems(10)
    stub = Stub({p.question: [r] for p, r in pairs}, delay_s=0.2)
    cfg = TeacherConfig(serve(stub), "teacher", timeout_s=5, concurrency=4)
    report = generate([p for p, _ in pairs], cfg, tmp_path / "out.jsonl")
    assert report.kept == 10
    assert stub.max_in_flight == 4


def test_killed_run_resumes_without_duplicates_or_losses(serve, tmp_path):
    pairs = made_up_problems(24)
    dataset = tmp_path / "problems.jsonl"
    dataset.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p, _ in pairs))
    stub = Stub({p.question: [r] for p, r in pairs}, delay_s=0.3)
    url = serve(stub)
    out = tmp_path / "cold.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "parallel_r1.cli",
        "data",
        "generate",
        "--teacher-url",
        url,
        "--model",
        "teacher",
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--concurrency",
        "2",
        "--timeout",
        "10",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 4):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the generator wrote nothing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert 4 <= len(first) < 24
    with out.open("a") as f:
        f.write('{"id": "problems/23", "resp')  # as if killed in the middle of a write

    from parallel_r1.coldstart import run_generate

    report = run_generate(TeacherConfig(url, "teacher", timeout_s=10, concurrency=4), str(dataset), out)
    assert report.skipped == len(first) and report.tried == 24 - len(first) and report.kept == report.tried
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 24
    assert set(ids) == {f"problems/{i}" for i in range(24)}
    assert ids[: len(first)] == [r["id"] for r in first]  # earlier lines are left as they were


def test_a_server_that_is_down_is_an_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = TeacherConfig(f"http://127.0.0.1:{port}", "teacher", timeout_s=1, retries=0)
    with pytest.raises(TeacherError, match="every request to the teacher failed"):
        generate([p for p, _ in made_up_problems(2)], cfg, tmp_path / "out.jsonl")


def test_yield_report_text():
    report = YieldReport(tried=10, kept=7, skipped=2, rejected=Counter({"wrong_answer": 2, "no_block": 1}))
    assert (
        report.describe() == "kept 7 / tried 10 (70.0%); skipped 2 done earlier; rejected: wrong_answer 2, no_block 1"
    )
