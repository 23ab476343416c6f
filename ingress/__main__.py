"""`python -m ingress` is the `smtp-ingress` command (ingress.tools.cli)."""

from ingress.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
