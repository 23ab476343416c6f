"""The spool: the only owner of spool files.

Lives here: store (every state change of a spool file: the durable write, claim, finish, defer,
delete, retry requests), state (the per-message delivery state file's format and its pure rules:
replies, settling, backoff), queue_ops (the operator's queue commands: list, hold, release,
delete, retry, under the same lock as the relay) and collector (the spool's gauges, counted on
disk at scrape time).

May import: ingress.core only (the import-linter layers contract in pyproject.toml).
"""
