"""The shared core: what every process of smtp-ingress uses, acceptor side and lane side alike.

Lives here: the versioned wire codec (wire), the configuration (config), JSON logging (log),
Prometheus metrics (metrics: the declarations; metrics_labels: the acceptor's label values;
metrics_server: the supervisor's scrape endpoint), the DNS resolver factory (resolver), the
token bucket (ratelimit), the child skeleton every supervised process runs on (child), process
tables through psutil and the file-descriptor limit (procs).
May import: the standard library and third-party libraries only; nothing else of ours (the
import-linter contract in pyproject.toml, run by `make lint`, enforces it).
"""
