"""The test kit: the real components the tests and the bench run against, in one place.

What lives here: ``harness`` (``Ingress``, the real supervisor and children on loopback ports,
plus SMTP client helpers), ``dnsserver`` (an authoritative DNS server on a loopback UDP/TCP port;
``python -m tests.kit.dnsserver records.json``), ``postfix`` (``PostfixInstance``, a private
Postfix on a loopback port), ``scripted_server`` (an SMTP server whose answers are scripted),
``procs`` (``Processes``, children stopped by PID), ``dkimkeys`` (DER/TXT builders for DKIM keys),
``haproxy`` (a real HAProxy in front of backends), ``redisserver`` (a real redis-server on a
unix socket), ``pki`` (trustme certificates), ``session``
(``HeldSession``, a raw SMTP session held open), ``clusterkit`` (cluster keys and ports),
``relaykit`` (the relay's, the spool's and the queue commands' test helpers), ``scrape`` (the
Prometheus endpoint read in a test), ``configkit`` (config files for the config rules' tests)
and ``measure_data_memory`` (a tool: acceptor RSS under idle and DATA sessions). Helpers two
test modules need live here, never in a test module (tests/unit/test_tests_layout.py). It may import
``ingress`` and ``workers`` and third-party libraries; it never imports ``tests.unit``,
``tests.integration`` or ``bench`` -- both the tests and the bench import it.
"""
