"""The tools: the supervisor and the operator's commands (`smtp-ingress run`, `status`,
`check-config`, `queue`, `keygen`; the modules, one line each: docs/development.md).

May import: anything of ours; nothing imports the tools. The supervisor alone imports no child's
code (a forbidden contract beside the layers contract in pyproject.toml).
"""
