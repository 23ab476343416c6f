"""Pure policy: the decisions, with no I/O and the clock as an argument, tested by tables.

Classification, identities and trust tiers, admission, deferrals, the session rules and the
reply table (the modules, one line each: docs/development.md).
May import: ingress.core only (enforced by the import-linter layers contract in pyproject.toml).
"""
