"""`cumo-mlx eval` end to end on tiny benchmark folders: the shipped demo model answering, an existing
answers file scored, a cut run resumed, an OpenAI-compatible server (a stub) asked, and bad input."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import eval_folders
import pytest
from cli_util import assert_one_error_line, run_cli
from eval_folders import SHAPES_RECORDS, write_answers

from cumo_mlx.eval import answerers, questions, score
from cumo_mlx.eval.report import chart_series, format_table

FOLDERS = {"textvqa": eval_folders.textvqa, "pope": eval_folders.pope, "scienceqa": eval_folders.scienceqa,
           "mmbench": eval_folders.mmbench, "shapes": eval_folders.shapes}  # fmt: skip


def records(path) -> list[dict]:
    """The answers file's lines without their random answer_id."""
    return [{k: v for k, v in json.loads(line).items() if k != "answer_id"} for line in path.read_text().splitlines()]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("task", FOLDERS)
def test_the_demo_model_answers_every_question_and_the_printed_score_is_the_file_s(task, tmp_path):
    FOLDERS[task](tmp_path)
    output = tmp_path / "answers" / f"{task}.jsonl"
    code, out, err = run_cli("eval", "--task", task, "--model", "demo", "--data-dir", tmp_path, "--output", output,
                             "--batch-size", "2", "--json")  # fmt: skip
    assert code == 0, err
    lines = records(output)
    assert [(r["question_id"], r["prompt"]) for r in lines] == [q.key for q in questions(task, tmp_path)]
    assert all(r["model_id"] == "demo" and r["metadata"] == {"task": task} for r in lines)
    recomputed = score(task, tmp_path, output)
    assert last_json(out) == recomputed.to_json() == json.loads((output.parent / f"{task}.metrics.json").read_text())
    assert (output.parent / f"{task}.metrics.png").read_bytes().startswith(b"\x89PNG")
    assert format_table(recomputed) in err and "Traceback" not in err


def test_limit_and_the_progress_bar(tmp_path):
    eval_folders.shapes(tmp_path)
    output = tmp_path / "answers.jsonl"
    code, out, err = run_cli("eval", "--task", "shapes", "--model", "demo", "--data-dir", tmp_path, "--output", output,
                             "--limit", "2", "--progress", "--json")  # fmt: skip
    assert code == 0, err
    assert len(records(output)) == 2 and last_json(out) == score("shapes", tmp_path, output, limit=2).to_json()
    assert last_json(out)["count"] == 2
    assert "answering: 100%" in err and "2/2" in err and "tok/s" in err  # tqdm: questions, ETA, tokens/s
    code, _, err = run_cli("eval", "--task", "shapes", "--model", "demo", "--data-dir", tmp_path, "--output", output)
    assert code == 0 and "answering" not in err  # no bar when stderr is not a terminal


def test_an_existing_answers_file_is_scored_without_a_model(tmp_path):
    folder = eval_folders.shapes(tmp_path)
    answers = write_answers(tmp_path / "llava.jsonl", [("0-0", "What shape is this?", "Circle."), ("1-0", "How many shapes are there?", "3")])
    code, out, err = run_cli("eval", "--task", "shapes", "--data-dir", folder.parent, "--answers", answers, "--json")
    assert code == 0, err
    # unanswered questions count wrong: 2 of 4 right
    assert last_json(out) == {"task": "shapes", "count": 4, "metrics": {"accuracy": 50.0, "categories": {"shape": 100.0, "count": 50.0, "colour": 0.0}}}
    assert (tmp_path / "llava.metrics.json").is_file() and (tmp_path / "llava.metrics.png").is_file()
    code, out, _ = run_cli("eval", "--task", "shapes", "--data-dir", folder.parent, "--answers", answers, "--limit", "1", "--json")
    assert last_json(out)["metrics"]["accuracy"] == 100.0  # over the first question only


def test_tables_and_charts_of_every_kind_of_metrics():
    from cumo_mlx.eval import Result

    mme = Result("mme", 4, {"perception": 150.0, "cognition": 0.0, "categories": {"existence": 150.0},
                            "acc": {"existence": 100.0}, "acc_plus": {"existence": 50.0}})  # fmt: skip
    assert format_table(mme).splitlines()[-2:] == ["categories     score       acc  acc_plus", "existence     150.00    100.00     50.00"]
    assert chart_series(mme) == {"score": {"existence": 150.0}}
    pope = Result("pope", 2, {"accuracy": 50.0, "categories": {"random": {"accuracy": 50.0, "f1": 40.0, "count": 2}}})
    assert format_table(pope).splitlines()[-1].split() == ["random", "50.00", "40.00", "2"]
    assert chart_series(pope) == {"accuracy": {"random": 50.0}, "f1": {"random": 40.0}}
    assert chart_series(Result("textvqa", 3, {"accuracy": 20.0})) == {"accuracy": {"accuracy": 20.0}}


def test_upload_tasks_write_the_grader_s_file_and_custom_only_answers(tmp_path):
    eval_folders.vqav2(tmp_path)
    answers = write_answers(tmp_path / "vqav2.jsonl", [(1, "Question 1?", "Two."), (2, "Question 2?", "yes")])
    code, out, err = run_cli("eval", "--task", "vqav2", "--data-dir", tmp_path, "--answers", answers, "--json")
    assert code == 0 and last_json(out) == {"task": "vqav2", "count": 2, "metrics": {}}, err
    upload = tmp_path / "vqav2.upload.json"
    assert str(upload) in err
    assert json.loads(upload.read_text()) == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "yes"},
                                              {"question_id": 3, "answer": ""}]  # fmt: skip
    custom = eval_folders.write_jsonl(tmp_path / "mine.jsonl", [{"question_id": "a", "text": "Hello?"}])
    code, out, err = run_cli("eval", "--task", "custom", "--model", "demo", "--data-dir", custom, "--output", tmp_path / "c.jsonl", "--json")
    assert code == 0 and last_json(out) == {"task": "custom", "count": 1, "metrics": {}}, err
    assert not (tmp_path / "c.metrics.json").exists()


def test_a_killed_run_resumed_gives_the_uncut_answers(tmp_path, monkeypatch):
    eval_folders.shapes(tmp_path)
    argv = ["eval", "--task", "shapes", "--model", "demo", "--data-dir", tmp_path, "--batch-size", "2"]
    assert run_cli(*argv, "--output", tmp_path / "one.jsonl")[0] == 0
    one = records(tmp_path / "one.jsonl")

    calls, real = [], answerers.batch_generate

    def killed_at_the_second_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(answerers, "batch_generate", killed_at_the_second_batch)
    cut = tmp_path / "cut.jsonl"
    code, _, err = run_cli(*argv, "--output", cut)
    assert code == 130 and err.strip().endswith("error: interrupted")
    assert records(cut) == one[:2]  # the batch in flight is lost, no more
    kept = cut.read_text().splitlines()
    cut.write_text("\n".join(kept) + "\n" + kept[1][:30])  # and a half-written line, as a kill mid-write leaves

    calls.clear()
    code, out, err = run_cli(*argv, "--output", cut, "--resume", "--json")
    assert code == 0, err
    assert calls == [2]  # only the questions left were asked
    assert cut.read_text().splitlines()[:2] == kept and records(cut) == one
    assert last_json(out) == score("shapes", tmp_path, tmp_path / "one.jsonl").to_json()


@pytest.fixture
def stub_server():
    """An OpenAI-compatible chat completions endpoint on 127.0.0.1 answering each shapes question with
    the answer of the last question of that text; `status` and `raw` replace the reply; `requests`
    holds (path, headers, body)."""
    answers = {record["question"]: record["answer"] for record in SHAPES_RECORDS}
    state = SimpleNamespace(requests=[], status=200, raw=None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append((self.path, dict(self.headers), body))
            text = body["messages"][0]["content"][0]["text"]
            reply = {"choices": [{"message": {"role": "assistant", "content": f"{answers.get(text, '?').title()}."}}],
                     "usage": {"completion_tokens": 2}}  # fmt: skip
            if state.status != 200:
                reply = {"error": {"message": "invalid API key"}}
            data = state.raw if state.raw is not None else json.dumps(reply).encode()
            self.send_response(state.status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()
    server.server_close()


def test_a_server_answers_through_the_openai_chat_api(stub_server, tmp_path):
    eval_folders.shapes(tmp_path)
    output = tmp_path / "server.jsonl"
    code, out, err = run_cli("eval", "--task", "shapes", "--server", stub_server.url + "/v1/", "--model", "cumo", "--api-key", "k3y",
                             "--data-dir", tmp_path, "--output", output, "--batch-size", "3", "--json")  # fmt: skip
    assert code == 0, err
    # the stub answers by the question's text: "How many shapes are there?" gets "two" both times
    assert [r["text"] for r in records(output)] == ["Circle.", "Two.", "Red.", "Two."]
    assert last_json(out) == score("shapes", tmp_path, output).to_json() and last_json(out)["metrics"]["accuracy"] == 75.0
    assert {r["model_id"] for r in records(output)} == {"cumo"}
    assert len(stub_server.requests) == 4  # a batch's requests come in any order: take the first question's
    [(path, headers, body)] = [r for r in stub_server.requests if "What shape" in json.dumps(r[2])]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k3y"
    assert body["model"] == "cumo" and body["temperature"] == 0 and body["max_tokens"] == 8  # shapes' budget
    [message] = body["messages"]
    text, image = message["content"]
    assert message["role"] == "user" and text == {"type": "text", "text": "What shape is this?"}  # no <image>
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,iVBOR")


@pytest.mark.parametrize(
    "status, raw, fragment",
    [(401, None, "answered HTTP 401: invalid API key (check --api-key)"), (200, b"<html>", "did not answer JSON"),
     (200, b'{"choices": []}', "answered no chat completion")],
)  # fmt: skip
def test_server_failures_are_one_line(stub_server, tmp_path, status, raw, fragment):
    eval_folders.shapes(tmp_path)
    stub_server.status, stub_server.raw = status, raw
    code, _, err = run_cli("eval", "--task", "shapes", "--server", stub_server.url, "--data-dir", tmp_path, "--output", tmp_path / "a.jsonl")
    assert fragment in assert_one_error_line(code, err)


def test_an_unreachable_server_is_one_line(tmp_path):
    eval_folders.shapes(tmp_path)
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        url = f"http://127.0.0.1:{closed.server_port}"  # closed at once: nothing listens there
    code, _, err = run_cli("eval", "--task", "shapes", "--server", url, "--data-dir", tmp_path, "--output", tmp_path / "a.jsonl")
    assert "cannot reach" in assert_one_error_line(code, err)


BAD_INPUT = {
    "unknown task": (["--task", "nope", "--answers", "{a}"], "'nope' is not one of"),
    "--limit 0": (["--model", "demo", "--output", "{o}", "--limit", "0"], "0 is not in the range x>=1"),
    "--answers with --model": (["--answers", "{a}", "--model", "demo"], "--answers scores an existing file: leave out --model"),
    "neither model nor answers": ([], "give --model (or --server) and --output"),
    "no --output": (["--model", "demo"], "--output ANSWERS.jsonl is required"),
    "--output a folder": (["--model", "demo", "--output", "{d}"], "is a folder"),
    "--api-key without --server": (["--model", "demo", "--output", "{o}", "--api-key", "k"], "--api-key is for --server"),
    "--server not http": (["--server", "ftp://x", "--output", "{o}"], "is not an http(s) URL"),
    "missing --data-dir": (["--answers", "{a}", "--data-dir", "{d}/nowhere"], "does not exist"),
    "missing question file": (["--model", "demo", "--output", "{o}", "--data-dir", "{d}/empty"], "questions.json is missing"),
    "missing answers file": (["--answers", "{d}/none.jsonl"], "answers file"),
    "malformed answers line": (["--answers", "{d}/bad.jsonl"], "line 2 is not JSON"),
    "answers of another task": (["--answers", "{d}/pope.jsonl"], "holds answers for task pope, not shapes"),
    "resume of another task's file": (["--model", "demo", "--output", "{d}/pope.jsonl", "--resume"], "holds answers for task pope"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line(case, tmp_path):
    eval_folders.shapes(tmp_path)
    (tmp_path / "empty" / "shapes").mkdir(parents=True)
    answers = write_answers(tmp_path / "a.jsonl", [("0-0", "What shape is this?", "circle")])
    (tmp_path / "bad.jsonl").write_text(answers.read_text() + "{oops\n")
    pope = {**json.loads(answers.read_text()), "metadata": {"task": "pope"}}
    (tmp_path / "pope.jsonl").write_text(json.dumps(pope) + "\n")
    before = sorted(tmp_path.rglob("*"))
    extra, fragment = BAD_INPUT[case]
    names = {"a": answers, "o": tmp_path / "out.jsonl", "d": tmp_path}
    argv = ["eval", "--task", "shapes", "--data-dir", tmp_path, *(str(a).format(**names) for a in extra)]
    code, out, err = run_cli(*argv)
    assert fragment in assert_one_error_line(code, err) and "Traceback" not in out + err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
