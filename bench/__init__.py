"""The benchmarks (``make bench``; never run by the test suite): the flood generator (``flood/``),
the throughput runner, the targets (smtp-ingress, plain aiosmtpd in ``baseline``, Postfix,
smtp-sink), the report renderer, and the latest results in ``results/``.

May import ``tests.kit`` (the Postfix manager, the DNS server, the process registry) and
third-party libraries; smtp-ingress itself runs as a child process. Nothing in ``tests`` imports
``bench`` except the bench's own unit tests. All traffic stays on loopback; every process it
starts it stops by PID.
"""
