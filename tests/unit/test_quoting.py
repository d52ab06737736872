"""The escaping rules of vfgen.quoting, checked against the parsers' documented behaviour."""

from __future__ import annotations

import shlex

import pytest

from vfgen import quoting


def test_nginx_str_escapes_quotes_and_backslashes_and_refuses_dollar():
    assert quoting.nginx_str('a "b" \\c ; } #') == '"a \\"b\\" \\\\c ; } #"'
    with pytest.raises(quoting.QuotingError):
        quoting.nginx_str("$host")
    with pytest.raises(quoting.QuotingError):
        quoting.nginx_str("a\nb")


def test_pcre_literal_escapes_metacharacters_but_not_unicode():
    assert quoting.pcre_literal("org/m.v1+x") == "org\\/m\\.v1\\+x"
    assert quoting.pcre_literal("café") == "café"


def test_systemd_word_doubles_specifiers_and_variables():
    assert quoting.systemd_word('50% of $HOME "x"\\') == '"50%% of $$HOME \\"x\\"\\\\"'


def test_systemd_exec_refuses_prefix_characters_on_the_executable():
    with pytest.raises(quoting.QuotingError):
        quoting.systemd_exec(["-/bin/sh", "x"])


def test_systemd_env_validates_the_key():
    assert quoting.systemd_env("K", 'v "1" 5%') == '"K=v \\"1\\" 5%%"'
    with pytest.raises(quoting.QuotingError):
        quoting.systemd_env("BAD KEY", "v")


@pytest.mark.parametrize("word", ["plain", "with space", "semi ;colon", "hash #x", "100%", "quote\"s", "it's", "", "a\\b", "é ü", "}{"])
def test_supervisor_word_round_trips_through_shlex_after_percent_expansion(word):
    rendered = quoting.supervisor_word(word)
    # supervisord expands %(..)s first (%% -> %), then shlex-splits.
    assert shlex.split(rendered.replace("%%", "%")) == [word]
    # configparser treats ';' or '#' after whitespace as a comment: never present unescaped.
    assert " ;" not in rendered and " #" not in rendered and "\t" not in rendered


def test_nginx_vars_formats_text_variables_and_captures_and_refuses_the_rest():
    from vfgen.quoting import QuotingError, nginx_vars

    assert nginx_vars([("text", 'm|"x\\'), ("var", "a_b1"), ("text", "|"), ("capture", "1")]) == '"m|\\"x\\\\${a_b1}|$1"'
    for bad in ([("text", "$host")], [("var", "a-b")], [("var", "1a")], [("capture", "0")], [("capture", "12")],
                [("other", "x")], [("text", "a\nb")]):
        with pytest.raises(QuotingError):
            nginx_vars(bad)
