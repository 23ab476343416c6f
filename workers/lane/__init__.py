"""The lane: the brokers and workers between the acceptors and the spool.

Lives here: broker (the ZeroMQ guide's load-balancing broker, one per lane), worker and
pipeline (a worker's batch: DKIM, trace headers, the durable write), dkim_check (DKIM
verification with a deadline per key lookup; with dkim_parse, the bounds and parsing before
dkimpy, and dkim_keys, the key lookups and the dead-key-domain table) and headers (the
Authentication-Results and Received fields we write, forged A-R stripping).

May import: ingress.core, ingress.policy and workers.spool; never the edge, the relay or the
tools (the import-linter layers contract in pyproject.toml).
"""
