"""Integration tests: real processes and real servers on loopback (``make integration``).

Lives here: the ingress as a user runs it (``tests.kit.harness.Ingress``: the real supervisor and
children), real Postfix (``PostfixInstance``), HAProxy, the DNS server, trustme TLS, the CLI as a
process, brokers and workers over real ZeroMQ sockets, the relay against a scripted downstream.
May import ``ingress``, ``workers`` and ``tests.kit``; never another test module (shared fixtures
live in ``conftest.py`` here, shared helpers in ``tests/kit/``: tests/unit/test_tests_layout.py
checks it), never ``bench``. Tests needing an optional program carry a ``needs_*`` marker
(tests/conftest.py).
"""
