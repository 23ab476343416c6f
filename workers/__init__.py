"""The lane side: what runs behind the acceptors, from the broker to the downstream MTA.

Lives here: the lane broker (broker), the lane workers (worker, pipeline: DKIM check in
dkim_check, trace headers in headers, the durable write in spool -- the only code that changes a
spool file), the relay package ``relay/`` (delivery state, DSN, SMTP and LMTP clients,
scheduler) with its TLS policy (relay_tls), and the spool operations the queue tools use
(queue_ops). May import: ``ingress.core`` and ``ingress.policy`` and third-party libraries; never
the acceptor side (``ingress.acceptor``, ``smtp``, ``evidence``, ``proxy``, ``dataread``,
``rcpt_verify``) nor the tools -- the import-linter contract in pyproject.toml enforces it.
"""
