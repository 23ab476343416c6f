"""smtp-ingress, the port-25 side: the shared core, the pure policy, the edge and the tools.

One package per layer: ``core/``, ``policy/``, ``edge/`` and ``tools/`` here, the lane side in
the ``workers`` package. The layout, and the import-linter layers contract in pyproject.toml
(``make lint``) that says who imports whom, are described once, in docs/development.md.
"""
