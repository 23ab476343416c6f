"""The shared core: what every process of smtp-ingress uses, acceptor side and lane side alike.

The wire codec, the configuration, logging, metrics, the DNS resolver, rate limits, the child
skeleton every supervised process runs on, and the small shared structures (the modules, one
line each: docs/development.md).
May import: the standard library and third-party libraries only; nothing else of ours (the
import-linter layers contract in pyproject.toml, run by `make lint`, enforces it).
"""
