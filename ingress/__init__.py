"""smtp-ingress, the port-25 side: the shared core, the pure policy, the edge and the tools.

Lives here, one package per layer (the folders are the layers; docs/development.md):
``core/`` (wire, config, log, metrics, resolver, ratelimit, the child skeleton: used by every
process; imports nothing else of ours), ``policy/`` (classify, tiers, admission, session rules,
replies: pure decisions over the core), ``edge/`` (the acceptors: what holds a client's
connection) and ``tools/`` (supervisor, cli, status, configshow, queuecmd). The lane side is the
``workers`` package. The import-linter layers contract in pyproject.toml (``make lint``)
enforces who imports whom.
"""
