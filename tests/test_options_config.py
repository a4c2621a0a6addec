"""Options from a TOML file (--config) and AGENT_<OPTION> variables: defaults < file <
environment < command line, through the command line's own coercion and checks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.python import usage

from agent.options import Options

REPO = Path(__file__).resolve().parent.parent


def parse(tmp_path, argv=(), environ=None, config=None) -> Options:
    """Options parsed from argv (plus a --data-dir in tmp_path), with config written to a
    file named by --config, and environ as the whole environment."""
    args = ["--data-dir", str(tmp_path / "data"), *argv]
    if config is not None:
        path = tmp_path / "agent.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(args)
    return options


def refused(tmp_path, **kwargs) -> str:
    with pytest.raises(usage.UsageError) as e:
        parse(tmp_path, **kwargs)
    return str(e.value)


def test_without_file_or_environment_the_defaults_hold(tmp_path):
    options = parse(tmp_path)
    assert options["parallel"] == 1 and options["timeout-unit"] == "s"
    assert options["keep-tcp-output"] == 0 and not options.sources


def test_the_file_sets_options_through_their_coercion(tmp_path):
    options = parse(tmp_path, config='parallel = 4\ntimeout-unit = "ms"\n'
                                     'keep-bytes = "512M"\nkill-grace = 2\n'
                                     'http = "tcp:8080:interface=127.0.0.1"\n')
    assert options["parallel"] == 4 and options["timeout-unit"] == "ms"
    assert options["keep-bytes"] == 512 << 20
    assert options["kill-grace"] == 2.0 and isinstance(options["kill-grace"], float)
    assert options["http"] == "tcp:8080:interface=127.0.0.1"


def test_keys_may_be_spelled_with_underscores(tmp_path):
    options = parse(tmp_path, config='timeout_unit = "ms"\nkeep_tcp_output = true\n')
    assert options["timeout-unit"] == "ms" and options["keep-tcp-output"] == 1


def test_the_same_option_spelled_twice_is_refused(tmp_path):
    message = refused(tmp_path, config="max-line = 100\nmax_line = 200\n")
    assert "max-line and max_line are the same option" in message


def test_the_environment_wins_over_the_file(tmp_path):
    options = parse(tmp_path, config='parallel = 4\nwhen-busy = "queue"\n',
                    environ={"AGENT_PARALLEL": "7"})
    assert options["parallel"] == 7 and options["when-busy"] == "queue"
    assert options.sources["parallel"] == "AGENT_PARALLEL"


def test_the_command_line_wins_over_the_environment_and_the_file(tmp_path):
    options = parse(tmp_path, argv=["--parallel", "2", "--when-busy=reject"],
                    config='parallel = 4\nwhen-busy = "queue"\n',
                    environ={"AGENT_PARALLEL": "7", "AGENT_WHEN_BUSY": "queue"})
    assert options["parallel"] == 2 and options["when-busy"] == "reject"


def test_the_command_line_short_option_wins_too(tmp_path):
    options = parse(tmp_path, argv=["-p", "3"], environ={"AGENT_PARALLEL": "7"})
    assert options["parallel"] == 3


@pytest.mark.parametrize("word, value", [("1", 1), ("true", 1), ("YES", 1),
                                         ("0", 0), ("false", 0), ("no", 0)])
def test_a_flag_from_the_environment(tmp_path, word, value):
    options = parse(tmp_path, environ={"AGENT_KEEP_TCP_OUTPUT": word},
                    config="keep-tcp-output = true\n" if value == 0 else "")
    assert options["keep-tcp-output"] == value


def test_a_flag_from_the_file_and_from_the_command_line(tmp_path):
    assert parse(tmp_path, config="keep-tcp-output = true\n")["keep-tcp-output"] == 1
    assert parse(tmp_path, config="keep-tcp-output = false\n")["keep-tcp-output"] == 0
    assert parse(tmp_path, argv=["--keep-tcp-output"], config="keep-tcp-output = false\n",
                 environ={"AGENT_KEEP_TCP_OUTPUT": "0"})["keep-tcp-output"] == 1


def test_a_flag_is_true_or_false(tmp_path):
    assert "AGENT_KEEP_TCP_OUTPUT='maybe'" in refused(
        tmp_path, environ={"AGENT_KEEP_TCP_OUTPUT": "maybe"})
    message = refused(tmp_path, config='keep-tcp-output = "yes"\n')
    assert "key keep-tcp-output: a flag is true or false" in message


def test_unknown_keys_are_an_error_that_names_them(tmp_path):
    message = refused(tmp_path, config="parallel = 2\nparalel = 3\nlisten_on = 1\n")
    assert "unknown keys listen_on, paralel" in message
    assert str(tmp_path / "agent.toml") in message


def test_the_file_cannot_name_another_file(tmp_path):
    assert "unknown key config" in refused(tmp_path, config='config = "other.toml"\n')


def test_variables_that_are_not_options_are_ignored(tmp_path):
    """AGENT_URL and the like are agentctl's."""
    options = parse(tmp_path, environ={"AGENT_URL": "http://x:1", "AGENT_CA": "ca.pem",
                                       "AGENT_PARALELL": "9"})
    assert options["parallel"] == 1


def test_agentctls_token_file_variable_is_not_the_agents_token_file(tmp_path):
    """A named (narrower) token in AGENT_TOKEN_FILE must not become the agent's admin token."""
    options = parse(tmp_path, environ={"AGENT_TOKEN_FILE": str(tmp_path / "client-token")})
    assert options["token-file"] == os.path.join(str(tmp_path / "data"), "token")


def test_a_bad_value_names_the_file_and_key(tmp_path):
    message = refused(tmp_path, config='parallel = "four"\n')
    assert f"{tmp_path / 'agent.toml'}, key parallel" in message and "'four'" in message
    message = refused(tmp_path, config='keep-bytes = "lots"\n')
    assert "key keep-bytes" in message
    message = refused(tmp_path, config="listen = [1, 2]\n")
    assert "key listen: expected a string or a number" in message


def test_a_bad_value_names_the_variable(tmp_path):
    assert refused(tmp_path, environ={"AGENT_MAX_LINE": "big"}).startswith("AGENT_MAX_LINE: ")


def test_a_value_the_checks_refuse_names_its_source(tmp_path):
    message = refused(tmp_path, config="parallel = -1\n")
    assert "--parallel must be 0 (unlimited) or more" in message
    assert f"(from {tmp_path / 'agent.toml'}, key parallel)" in message
    message = refused(tmp_path, environ={"AGENT_TIMEOUT_UNIT": "h"})
    assert message == "--timeout-unit must be s or ms (from AGENT_TIMEOUT_UNIT)"
    assert refused(tmp_path, argv=["--timeout-unit", "h"]) == "--timeout-unit must be s or ms"


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    options = Options(environ={})
    with pytest.raises(usage.UsageError, match="--config .*nope.toml: no such file"):
        options.parseOptions(["--config", str(tmp_path / "nope.toml")])


def test_a_config_file_that_is_not_toml_is_a_clear_error(tmp_path):
    assert "not valid TOML" in refused(tmp_path, config="parallel = = 3\n")


def test_the_config_file_may_come_from_the_environment(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text("max-connections = 12\n")
    assert parse(tmp_path, environ={"AGENT_CONFIG": str(path)})["max-connections"] == 12
    message = refused(tmp_path, environ={"AGENT_CONFIG": str(tmp_path / "gone.toml")})
    assert message.startswith("AGENT_CONFIG ") and "no such file" in message


def test_the_command_lines_config_wins_over_agent_config(tmp_path):
    options = parse(tmp_path, config="max-connections = 5\n",
                    environ={"AGENT_CONFIG": str(tmp_path / "gone.toml")})
    assert options["max-connections"] == 5


def test_the_file_checks_see_the_merged_values(tmp_path):
    """--allow-file, --tokens-file and --token-file from the file reach postOptions' checks."""
    allow = tmp_path / "allow.toml"
    allow.write_text('[[allow]]\nprogram = "/bin/true"\n')
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[tokens.reader]\nsha256 = "' + "ab" * 32 + '"\nscopes = ["read"]\n')
    tokens.chmod(0o600)
    options = parse(tmp_path, config=f'allow-file = "{allow}"\ntokens-file = "{tokens}"\n')
    assert options.allow is not None
    assert set(options.principals) and not options.admin_token_wanted
    token = tmp_path / "admin-token"
    token.write_text("short\n")
    token.chmod(0o600)
    with pytest.raises(usage.UsageError):
        parse(tmp_path, config=f'token-file = "{token}"\n')
    options = parse(tmp_path, environ={"AGENT_TOKENS_FILE": str(tokens)})
    assert set(options.principals) and not options.admin_token_wanted


def test_the_example_config_file_is_valid(tmp_path):
    """examples/agent.toml must not rot: every key is an option and every value passes."""
    options = Options(environ={})
    options.parseOptions(["--config", str(REPO / "examples" / "agent.toml"),
                          "--data-dir", str(tmp_path), "--token-file", str(tmp_path / "t")])
    assert len(options.sources) >= 8
