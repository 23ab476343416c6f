"""The spool: the only owner of spool files.

Lives here: store (every state change of a spool file: the durable write, claim, finish, defer,
delete, retry requests), state (the per-message delivery state file's format and its pure rules:
replies, settling, backoff) and queue_ops (the operator's queue commands: list, hold, release,
delete, retry, under the same lock as the relay).

May import: ingress.core only (the import-linter layers contract in pyproject.toml).
"""
