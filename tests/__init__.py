"""The test suite: ``unit/`` (pure parts, seconds), ``integration/`` (real processes and servers on
loopback) and ``kit/`` (the real components both the tests and the bench run against).

``conftest.py`` registers the ``needs_postfix`` / ``needs_haproxy`` / ``needs_systemd`` markers;
``integration/conftest.py`` holds the fixtures several integration modules share (``postfix``,
``dkim_key``, ``pki``). No test module imports another (tests/unit/test_tests_layout.py).
Tests may import ``ingress``, ``workers`` and ``tests.kit``; they never import ``bench`` (except
the bench's own unit tests, which test ``bench`` itself). All traffic stays on loopback, and
every process a test starts it stops by PID.
"""
