"""Every command in README.md's ```bash blocks runs as pasted: shell quoting, and a dry parse of each
`jaxldm ...` command line with the real argument parser (nothing is executed)."""

import pathlib
import re
import shlex

import pytest

from jaxldm import cli
from jaxldm.config import split_override_args

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SHELL_OPERATORS = set("();<>|&")


def _bash_lines() -> list[tuple[int, str]]:
  """(line number, command line) of every ```bash block, backslash continuations joined."""
  out, block, pending = [], False, None
  for number, line in enumerate(README.read_text().splitlines(), 1):
    if line.startswith("```"):
      block = line.strip() == "```bash"
      continue
    if not block:
      continue
    start, text = pending if pending else (number, "")
    text += line
    if text.endswith("\\"):
      pending = (start, text[:-1])
      continue
    pending = None
    if text.strip():
      out.append((start, text))
  return out


def _tokens(text: str) -> list[str]:
  """Shell words, with unquoted operators (|, &&, ;, >) as tokens of their own, comments dropped."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _jaxldm_commands(tokens: list[str]) -> list[list[str]]:
  """The argv after each `jaxldm` (or `.venv/bin/jaxldm`) word, up to the next shell operator."""
  commands, current = [], None
  for token in tokens:
    if set(token) <= SHELL_OPERATORS:
      current = None
    elif current is not None:
      current.append(token)
    elif token == "jaxldm" or token.endswith("/jaxldm"):
      current = []
      commands.append(current)
  return commands


LINES = _bash_lines()


def test_readme_has_commands():
  assert sum(bool(_jaxldm_commands(_tokens(text))) for _, text in LINES) >= 20


@pytest.mark.parametrize("number,text", LINES, ids=[f"README.md:{n}" for n, _ in LINES])
def test_no_unquoted_pipe_in_config_override(number, text):
  tokens = _tokens(text)
  for before, after in zip(tokens, tokens[1:]):
    if before.startswith("--config.") and set(after) <= SHELL_OPERATORS:
      pytest.fail(f"README.md:{number}: {before!r} is followed by the shell operator {after!r}; "
                  f"quote the argument: '{before}{after}...'")


@pytest.mark.parametrize("number,text", LINES, ids=[f"README.md:{n}" for n, _ in LINES])
def test_jaxldm_commands_parse(number, text):
  parser = cli.build_parser()
  for argv in _jaxldm_commands(_tokens(text)):
    if "..." in argv:  # An elided command ("jaxldm train ... --coordinator auto"): not meant to run as is.
      continue
    overrides, rest = split_override_args(argv)
    try:
      args, unknown = parser.parse_known_args(rest)
    except SystemExit:
      pytest.fail(f"README.md:{number}: `jaxldm {shlex.join(argv)}` does not parse")
    assert not unknown, f"README.md:{number}: unknown arguments {unknown}"
    assert hasattr(args, "func"), f"README.md:{number}: `jaxldm {shlex.join(argv)}` names no command"
    if overrides:
      assert getattr(args, "takes_overrides", False), f"README.md:{number}: {overrides} on a command without --config"
    for override in overrides:
      assert re.fullmatch(r"--config(\.\w+)+=.*", override), f"README.md:{number}: malformed override {override!r}"
