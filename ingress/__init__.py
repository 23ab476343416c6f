"""smtp-ingress, the port-25 side: the shared core, the pure policy, the acceptors and the tools.

Lives here: ``core/`` (wire, config, log, metrics, resolver, ratelimit, the child skeleton: used
by every process), ``policy/`` (classify, admission, session rules, replies: pure decisions), the
acceptor side (acceptor, smtp -- the aiosmtpd glue --, evidence, proxy, dataread, rcpt_verify,
verify_store) and the tools (supervisor, cli, status, configshow, queuecmd). May import: the
acceptor side imports ``ingress.core`` and ``ingress.policy``, never ``workers`` nor the tools;
the supervisor starts every child by module name and imports neither side; the other tools may
import ``workers`` (queue commands act on the spool). The import-linter contract in pyproject.toml
(``make lint``) enforces this.
"""
