"""The edge: what holds a client's TCP connection, from accept to the lane's answer.

Lives here: the acceptor processes (acceptor: the listeners, the context a session runs in, the
three entry points the supervisor starts), the SMTP dialogue (smtp: aiosmtpd's SMTP with our
traps worked around; smtp_data, dataread: DATA in bulk; handler: the per-command glue to the
policy), the lobby (a connection's seat before its greeting), the hand-off between acceptors
(handoff) and the mutual-TLS port (mtls), the session table (sessions), the lanes client (lanes),
the evidence lookups (evidence, spf_service), the PROXY protocol reader (proxy), recipient
verification (rcpt_verify, verify_store), what the edge learns (learned_store) and the shared
state across edges in Redis (cluster_state: the mirrors and shared limits; cluster_link: the
connection and its loop; cluster_redis: keys, scripts and reply checks).

May import: ingress.core and ingress.policy; never the lane, the spool, the relay or the tools
(the import-linter layers contract in pyproject.toml, `make lint`).
"""
