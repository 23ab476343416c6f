"""The lane side: what runs behind the acceptors, from the broker to the downstream MTA.

Lives here, one package per layer: ``lane/`` (the lane brokers and workers: DKIM, trace headers,
the durable write), ``spool/`` (the only owner of spool files: the store, the delivery state
format, the queue operations) and ``relay/`` (the relay process: scheduler, SMTP and LMTP
clients, DSN, XCLIENT/XFORWARD). The lane and the relay import ``ingress.core``,
``ingress.policy`` and the spool, never each other nor the edge; the spool imports only the
core. The import-linter layers contract in pyproject.toml (``make lint``) enforces it.
"""
