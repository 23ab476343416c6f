"""The spool: the only owner of spool files.

Every state change of a spool file, the relay's per-message state-file format and its pure
rules, and the operator's queue commands under the relay's lock (the modules, one line each:
docs/development.md).

May import: ingress.core only (the import-linter layers contract in pyproject.toml).
"""
