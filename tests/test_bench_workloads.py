"""invoke bench --workload prefix|multi-turn and --prompts FILE, checked by what the server of known
timing received (its --log): prompts sharing exactly P tokens of prefix, conversations whose turns
carry their history with the server's own answers, a user's prompts sent as written, and a bad
prompts file refused line by line with nothing sent."""

from __future__ import annotations

import json
import os

import pytest
from test_bench import bench_json, invoke, timed_server  # noqa: F401  (fixtures)

from timed_server import WORD
from trtllm_deploy.measure.bench.shapes import PREFIX_WORDS
from trtllm_deploy.measure.bench.workload import WORDS


def received(log) -> list[dict]:
    """The completion requests' bodies the server logged, in the order it read them."""
    return [json.loads(line)["body"] for line in log.read_text().splitlines()] if log.exists() else []


def prompt_of(body: dict) -> str:
    return body["prompt"] if "prompt" in body else body["messages"][-1]["content"]


def tokenizer(folder):
    """A tokenizer.json made here (nothing downloaded): one id a word, the bench's words, the prefix's
    and numbers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0} | {word: i + 1 for i, word in enumerate(dict.fromkeys(WORDS + PREFIX_WORDS))}
    vocab |= {str(n): len(vocab) + n for n in range(200)}
    made = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    made.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    made.save(str(folder / "tokenizer.json"))
    return made


def common_prefix(a: list, b: list) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def test_prefix_prompts_share_exactly_p_words_and_differ_after(invoke, timed_server, tmp_path):  # noqa: F811
    log = tmp_path / "requests.jsonl"
    url = timed_server(2, 1, "--log", str(log))
    result = bench_json(invoke, "--url", url, "--workload", "prefix", "--prefix-tokens", "20",
                        "--input-tokens", "50", "--concurrency", "2", "--requests", "6", "--warmup", "0",
                        "--output-tokens", "2",
                        "--out", str(tmp_path / "o"))
    assert result["workload"]["kind"] == "prefix" and result["workload"]["shape"] == {"prefix_tokens": 20}
    prompts = [prompt_of(body).split() for body in received(log)]
    assert len(prompts) == 7  # the first request that settles the options, then six
    assert all(len(words) == 50 for words in prompts)
    distinct = {tuple(words) for words in prompts[1:]}
    assert len(distinct) == 6  # each one its own after the prefix
    assert {common_prefix(a, b) for a in distinct for b in distinct if a != b} == {20}


def test_prefix_prompts_share_exactly_p_tokens_of_the_models_tokenizer(invoke, timed_server, tmp_path):  # noqa: F811
    made = tokenizer(tmp_path / "tok")
    log = tmp_path / "requests.jsonl"
    url = timed_server(2, 1, "--log", str(log))
    bench_json(invoke, "--url", url, "--workload", "prefix", "--prefix-tokens", "32", "--input-tokens", "40",
               "--tokenizer", str(tmp_path / "tok"), "--concurrency", "1", "--requests", "4", "--warmup", "0",
               "--output-tokens", "2", "--out", str(tmp_path / "o"))
    ids = [made.encode(prompt_of(body), add_special_tokens=False).ids for body in received(log)[1:]]
    assert len(ids) == 4 and all(len(each) == 40 for each in ids)
    assert 0 not in {i for each in ids for i in each}  # every word known: the count is the tokenizer's
    assert {common_prefix(a, b) for a in ids for b in ids if a is not b} == {32}


def test_multi_turn_turns_carry_the_history_with_the_servers_answers(invoke, timed_server, tmp_path):  # noqa: F811
    log = tmp_path / "requests.jsonl"
    url = timed_server(3, 1, "--log", str(log))
    result = bench_json(invoke, "--url", url, "--workload", "multi-turn", "--turns", "3",
                        "--concurrency", "2",
                        "--requests", "12", "--warmup", "0", "--input-tokens", "6", "--output-tokens", "5",
                        "--out", str(tmp_path / "o"))
    assert result["workload"]["path"] == "/v1/chat/completions"
    assert result["workload"]["shape"] == {"turns": 3}
    [level] = result["levels"]
    assert level["summary"]["succeeded"] == 12
    assert [(t["turn"], t["requests"]) for t in level["summary"]["turns"]] == [(1, 4), (2, 4), (3, 4)]
    bodies = received(log)[1:]
    assert len(bodies) == 12
    by_first = {}
    for body in bodies:
        by_first.setdefault(body["messages"][0]["content"], []).append(body["messages"])
    assert len(by_first) == 4  # four conversations of three turns
    answer = WORD * 5          # the server's own answer to every turn
    for turns in by_first.values():
        assert [len(messages) for messages in turns] == [1, 3, 5]  # sequential: each after the last
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later[:len(earlier)] == earlier
            assert later[len(earlier)] == {"role": "assistant", "content": answer}
            assert later[-1]["role"] == "user" and later[-1]["content"] not in {m["content"] for m in earlier}


def test_a_users_prompts_file_is_sent_as_written(invoke, timed_server, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "write a haiku about the sea", "output_tokens": 3}\n\n'
                       '{"messages": [{"role": "system", "content": "be short"}, '
                       '{"role": "user", "content": "what is a GPU"}]}\n')
    log = tmp_path / "requests.jsonl"
    url = timed_server(2, 1, "--log", str(log))
    result = bench_json(invoke, "--url", url, "--prompts", str(prompts), "--concurrency", "1",
                        "--requests", "4",
                        "--warmup", "0", "--output-tokens", "7", "--out", str(tmp_path / "o"))
    assert result["workload"]["kind"] == "file" and result["workload"]["shape"]["lines"] == 2
    bodies = received(log)[1:]
    # A file with messages goes to chat; its plain prompts become a user message there.
    assert [b["messages"] for b in bodies] == [
        [{"role": "user", "content": "write a haiku about the sea"}],
        [{"role": "system", "content": "be short"}, {"role": "user", "content": "what is a GPU"}]] * 2
    assert [b["max_tokens"] for b in bodies] == [3, 7, 3, 7]
    assert result["levels"][0]["summary"]["output_tokens"] == 20


@pytest.mark.parametrize("lines, line, what", [
    (['{"prompt": "fine"}', "{not json"], 2, "not JSON"),
    (['["a list"]'], 1, "a JSON list, not an object"),
    (['{"prompt": "x", "max_tokens": 5}'], 1, "unknown key(s) max_tokens"),
    (['{"prompt": "x", "messages": []}'], 1, 'give "prompt" or "messages", one of them'),
    (['{"prompt": ""}'], 1, '"prompt" must be non-empty text'),
    (['{"prompt": "ok"}', '{"prompt": "ok"}', '{"messages": [{"role": "user"}]}'], 3,
     '"messages" must be a non-empty list'),
    (['{"prompt": "x", "output_tokens": 0}'], 1, '"output_tokens" 0 must be a whole number'),
    (['{"prompt": "x", "output_tokens": "8"}'], 1, "\"output_tokens\" '8' must be a whole number"),
])
def test_a_bad_prompts_line_exits_2_naming_file_and_line_and_nothing_is_sent(invoke, timed_server, tmp_path,  # noqa: F811
                                                                             lines, line, what):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    log = tmp_path / "requests.jsonl"
    url = timed_server(1, 1, "--log", str(log))
    done = invoke("bench", "--url", url, "--prompts", str(prompts), "--requests", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{prompts}:{line}: {what}" in done.stderr and "expected one JSON object a line" in done.stderr
    assert "Traceback" not in done.stderr
    assert not log.exists() and received(log) == []  # the server never got a request


def test_an_empty_or_missing_prompts_file_exits_2(invoke, tmp_path):  # noqa: F811
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    done = invoke("bench", "--url", "http://127.0.0.1:9", "--prompts", str(tmp_path / "empty.jsonl"))
    assert done.returncode == 2 and "no prompts in it" in done.stderr, done.stderr
    done = invoke("bench", "--url", "http://127.0.0.1:9", "--prompts", str(tmp_path / "none.jsonl"))
    assert done.returncode == 2 and "cannot read it" in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    (["--workload", "sharegpt"], "--workload 'sharegpt': give one of random, prefix, multi-turn, depth"),
    (["--prefix-tokens", "8"], "--prefix-tokens belongs to --workload prefix"),
    (["--workload", "prefix", "--prefix-tokens", "128"], "--prefix-tokens 128: give a shared prefix"),
    (["--turns", "3"], "--turns belongs to --workload multi-turn"),
    (["--workload", "multi-turn", "--turns", "1"], "a conversation needs at least 2 turns"),
    (["--workload", "multi-turn", "--request-rate", "2"], "runs at a concurrency, not at a --request-rate"),
    (["--workload", "prefix", "--prompts", os.devnull], "a prompts file replaces the generated prompts"),
])
def test_workload_flags_that_do_not_fit_exit_2(invoke, args, message):  # noqa: F811
    done = invoke("bench", "--url", "http://127.0.0.1:9", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_prefix_caching_shows_in_the_ttft_of_the_prefix_workload_and_not_of_random(invoke, timed_server,  # noqa: F811
                                                                                   tmp_path):
    """On a server that computes only what no earlier prompt started with (5 ms, then 0.1 ms a word),
    prompts sharing 192 of their 256 words pay for 64 of them; random prompts, unique from their first
    word, pay for all 256."""
    url = timed_server(5, 1, "--workers", "1", "--prefix-cache", "--prefill-ms-per-token", "0.1")
    common = ["--url", url, "--input-tokens", "256", "--concurrency", "1", "--requests", "6", "--warmup", "0",
              "--output-tokens", "2"]
    shared = bench_json(invoke, *common, "--workload", "prefix", "--prefix-tokens", "192",
                        "--out", str(tmp_path / "p"))
    unique = bench_json(invoke, *common, "--out", str(tmp_path / "r"))
    assert shared["levels"][0]["summary"]["ttft_ms"]["p50"] == pytest.approx(5 + 0.1 * 64, abs=3)
    assert unique["levels"][0]["summary"]["ttft_ms"]["p50"] == pytest.approx(5 + 0.1 * 256, abs=3)
