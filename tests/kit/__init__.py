"""The test kit: the real components the tests and the bench run against, in one place.

What lives here: ``harness`` (``Ingress``, the real supervisor and children on loopback ports,
plus SMTP client helpers), ``dnsserver`` (an authoritative DNS server on a loopback UDP/TCP port;
``python -m tests.kit.dnsserver records.json``), ``postfix`` (``PostfixInstance``, a private
Postfix on a loopback port), ``scripted_server`` (an SMTP server whose answers are scripted),
``procs`` (``Processes``, children stopped by PID), ``dkimkeys`` (DER/TXT builders for DKIM keys)
and ``measure_data_memory`` (a tool: acceptor RSS under idle and DATA sessions). It may import
``ingress`` and ``workers`` and third-party libraries; it never imports ``tests.unit``,
``tests.integration`` or ``bench`` -- both the tests and the bench import it.
"""
