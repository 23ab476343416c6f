"""The lane side: what runs behind the acceptors, from the broker to the downstream MTA.

One package per layer: ``lane/`` (the brokers and workers), ``spool/`` (the only owner of spool
files) and ``relay/``. The layout, and the import-linter layers contract in pyproject.toml
(``make lint``) that says who imports whom, are described once, in docs/development.md.
"""
