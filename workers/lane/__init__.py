"""The lane: the brokers and workers between the acceptors and the spool.

One broker per lane (the ZeroMQ guide's load-balancing broker) and its workers: DKIM, the trace
headers, the durable write, then the ACK (the modules, one line each: docs/development.md).

May import: ingress.core, ingress.policy and workers.spool; never the edge, the relay or the
tools (the import-linter layers contract in pyproject.toml).
"""
