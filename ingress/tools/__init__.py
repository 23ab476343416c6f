"""The tools: the supervisor and the operator's commands.

Lives here: supervisor (binds the listeners and starts every child by module name), cli (the
`smtp-ingress` command), status, configshow (`check-config --show`) and queuecmd (`smtp-ingress
queue`, acting on the spool through workers.spool.queue_ops).

May import: anything of ours; nothing imports the tools. The supervisor alone imports no child's
code (a forbidden contract beside the layers contract in pyproject.toml).
"""
