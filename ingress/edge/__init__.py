"""The edge: what holds a client's TCP connection, from accept to the lane's answer.

The acceptor processes, the SMTP dialogue, the lobby, the hand-off to the fast acceptors, the
mutual-TLS port, the evidence lookups, recipient verification and the state shared across edges
(the modules, one line each: docs/development.md).

May import: ingress.core and ingress.policy; never the lane, the spool, the relay or the tools
(the import-linter layers contract in pyproject.toml, `make lint`).
"""
