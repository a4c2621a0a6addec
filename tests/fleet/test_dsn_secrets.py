"""A connection string libpq cannot read is refused without showing any piece of it:
libpq's message quotes where it stumbled, which may be inside the password."""
from __future__ import annotations

import pytest

from agent.fleet import dsn


@pytest.mark.parametrize("text, secret", [
    ("host=db password=sec ret", "ret"),
    ("postgresql://agent:p%zz@db/agent", "p%zz"),
])
def test_a_bad_connection_string_is_refused_without_its_pieces(text, secret):
    with pytest.raises(dsn.BadDsn) as refused:
        dsn.parse(text)
    assert secret not in str(refused.value)
    assert str(refused.value).startswith("--fleet is not a PostgreSQL connection string: ")


def test_the_message_keeps_what_libpq_says_is_wrong():
    with pytest.raises(dsn.BadDsn, match='missing "=" after "..." in connection info string'):
        dsn.parse("host=db password=sec ret")
