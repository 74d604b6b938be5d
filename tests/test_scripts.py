"""Remote scripts (hosts/scripts.py) on a real Local target and over real SSH: sections, arguments
arriving verbatim, forged markers, failures told by node, step and the script's own words (never
its text), and time limits; and the safety net that keeps any error from printing a script."""

from __future__ import annotations

import hashlib
import time

import pytest

from trtllm_deploy import secrets as secrets_module
from trtllm_deploy.hosts import scripts, shell
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.scripts import Script, StepFailed, StepTimedOut
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import CommandFailed, CommandTimedOut

# A line no error message may ever show: it is only in the scripts' text.
SENTINEL = "SCRIPT-TEXT-SENTINEL"


@pytest.fixture(params=["local", "ssh"])
def target(request, sshd_node):
    target = Local("here") if request.param == "local" else SSH(sshd_node)
    yield target
    target.close()


SECTIONS = Script("print three parts", f"""# {SENTINEL}
echo before
mark first
printf 'one\\ntwo\\n'
mark second
printf 'no newline'
mark empty
""")


def test_output_comes_back_in_its_sections(target):
    ran = scripts.run(target, SECTIONS)
    assert ran.ok and ran.stdout == "before"
    assert ran.lines("first") == ["one", "two"]
    assert ran.sections["second"] == "no newline"
    assert ran.sections["empty"] == ""
    assert set(ran.sections) == {"", "first", "second", "empty"}


ECHO_ARGS = Script("echo its arguments", "for a do printf '%s\\0' \"$a\"; done")

TRICKY = {
    "space": "two words",
    "single-quote": "it's",
    "double-quote": 'say "hi"',
    "newline": "line one\nline two",
    "trailing-newline": "ends with a newline\n",
    "dollar": "$HOME ${PATH} $(id -u) `id -u`",
    "glob": "*",
    "dash": "-n",
    "empty": "",
    "semicolon": "a; rm -rf /tmp/nothing-here",
    "backslash": "back\\slash\\n",
    "unicode": "héllo ✓",
    "marker-like": "@@0123456789abcdef first",
}


@pytest.mark.parametrize("word", TRICKY.values(), ids=TRICKY.keys())
def test_each_argument_arrives_verbatim(target, word):
    assert scripts.run(target, ECHO_ARGS, word).stdout.split("\0")[:-1] == [word]


def test_many_arguments_arrive_in_order(target):
    words = list(TRICKY.values())
    assert scripts.run(target, ECHO_ARGS, *words, 3, 2.5).stdout.split("\0")[:-1] == \
        [*words, "3", "2.5"]


FORGER = Script("print what looks like marks", """
printf '@@0123456789abcdef forged\\n'
printf '@@ forged-too\\n'
printf '%s\\n' "$1"
mark real
echo inside
""")


def test_a_forged_marker_without_the_nonce_is_not_a_section(target):
    ran = scripts.run(target, FORGER, "@@feedfacefeedface from-an-argument")
    assert set(ran.sections) == {"", "real"}
    assert "@@0123456789abcdef forged" in ran.stdout and "from-an-argument" in ran.stdout
    assert ran.sections["real"] == "inside"


FAILING = Script("check the widget", f"""# {SENTINEL}
echo "some output"
echo "the widget is missing: install it with apt-get install widget" >&2
exit 3
""")


def test_a_failing_step_names_node_step_and_its_own_words_never_its_text(target):
    with pytest.raises(StepFailed) as caught:
        scripts.run(target, FAILING)
    message = str(caught.value)
    assert message.startswith(f"{target.name}: check the widget failed (exit 3)")
    assert "the widget is missing: install it with apt-get install widget" in message
    assert SENTINEL not in message and "sh -c" not in message and "exit 3\n" not in message
    assert caught.value.result.exit_code == 3


def test_without_check_a_failure_is_returned(target):
    ran = scripts.run(target, FAILING, check=False)
    assert not ran.ok and ran.exit_code == 3 and ran.stdout == "some output"
    assert "widget is missing" in ran.stderr


# The sleeps in this file are the commands to be stopped for running past their limits.
SLOW = Script("wait for the widget", f"# {SENTINEL}\nsleep 30\n", timeout=1)


def test_a_step_past_its_time_limit_is_stopped_and_named(target):
    started = time.monotonic()
    with pytest.raises(StepTimedOut) as caught:
        scripts.run(target, SLOW)
    assert time.monotonic() - started < 15
    assert isinstance(caught.value, CommandTimedOut)  # callers that catch timeouts still do
    message = str(caught.value)
    assert message == f"{target.name}: wait for the widget failed: still running after 1 s, stopped"


def test_a_run_may_set_its_own_time_limit(target):
    with pytest.raises(StepTimedOut, match="after 0.5 s"):
        scripts.run(target, Script("wait", "sleep 30"), timeout=0.5)


ENVIRONMENT = Script("show the environment", """
printf '%s|%s|%s\\n' "$PLAIN" "$(printf %s "$SECRET_VALUE" | sha256sum | cut -c1-64)" "$(cat)"
case $HOME in /*) echo home-set;; esac
""")


def test_env_stdin_secrets_and_home(target, monkeypatch):
    monkeypatch.setattr(secrets_module, "_values", set())  # this test's secret stays in this test
    secret = "s3cr3t-value-for-scripts"
    ran = scripts.run(target, ENVIRONMENT, env={"PLAIN": "a b"}, stdin="from stdin",
                      secrets={"SECRET_VALUE": secret})
    digest = hashlib.sha256(secret.encode()).hexdigest()  # the output itself is redacted
    assert ran.lines() == [f"a b|{digest}|from stdin", "home-set"]
    assert secret not in " ".join(ran.result.argv)


def test_a_prefix_runs_the_script_inside_something(target):
    ran = scripts.run(target, Script("show FROM", 'echo "$FROM"'), prefix=("env", "FROM=prefix"))
    assert ran.stdout == "prefix"


# --- the safety net: no error prints a script --------------------------------------------------

@pytest.mark.parametrize("argv, shown", [
    (["sh", "-c", "a\nb", "sh", "x y"], "sh -c <script> sh 'x y'"),
    (["bash", "-ec", "one-liner"], "bash -ec <script>"),
    (["/bin/sh", "-e", "-c", "x"], "/bin/sh -e -c <script>"),
    (["docker", "exec", "-i", "box", "sh", "-c", "x", "s"], "docker exec -i box sh -c <script> s"),
    (["python3", "-c", "print(1)"], "python3 -c <script>"),
    (["grep", "-c", "pattern", "file name"], "grep -c pattern 'file name'"),
    (["echo", "sh", "-c"], "echo sh -c"),
], ids=["sh", "bash-flags", "path-and-options", "in-container", "python", "not-a-shell", "no-script"])
def test_an_inline_script_is_shown_as_a_placeholder(argv, shown):
    assert shell.show(argv) == shown


def test_command_failed_shows_the_command_not_the_script(target):
    with pytest.raises(CommandFailed) as caught:
        target.run(["sh", "-c", f"# {SENTINEL}\necho 'what went wrong' >&2\nexit 4", "sh", "arg"])
    message = str(caught.value)
    assert "`sh -c <script> sh arg` exited with 4" in message and "what went wrong" in message
    assert SENTINEL not in message


def test_command_timed_out_shows_the_command_not_the_script(target):
    with pytest.raises(CommandTimedOut) as caught:
        target.run(["sh", "-c", f"# {SENTINEL}\nsleep 30"], timeout=1)
    assert "`sh -c <script>` ran past 1 s" in str(caught.value)
    assert SENTINEL not in str(caught.value)
