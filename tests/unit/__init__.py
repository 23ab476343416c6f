"""Unit tests: pure logic, table-driven, no process, no server, no socket (``make unit``, seconds).

Lives here: the policy tables (classify, admission, session rules), the wire codec, config
validation, DATA parsing, PROXY parsing, spool file handling in a tmp directory, the relay's pure
delivery state and DSN, and the bench's own accounting and report code. May import ``ingress``,
``workers``, ``bench`` (to test it) and ``tests.kit`` helpers that start nothing; anything that
starts a process or serves a socket belongs in ``tests/integration/``.
"""
