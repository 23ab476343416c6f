"""Pure policy: the decisions, with no I/O and the clock as an argument, tested by tables.

Lives here: classification of evidence into a lane (classify), connection admission (admission),
the per-command session rules and error limits (session_rules), the SMTP reply table (replies).
May import: ingress.core only (enforced by the import-linter contract in pyproject.toml).
"""
