"""bench.cost's pure parts: what counts as a shed transaction or a refused connection in
bench.flood's spam summary, the per-unit figure less the idle CPU, and the report section."""

from __future__ import annotations

from typing import Any

from bench.cost import PHASES, less_idle, markdown, units

SPAM = {"shed_by_stage": {"RCPT 451": 90, "DOT 451": 2, "MAIL 450": 3, "banner 421": 7,
                          "RSET 421": 1}}


def test_units_count_4xx_in_a_transaction_or_as_the_banner() -> None:
    assert units("shed", SPAM) == 95          # MAIL, RCPT, end of data; not the banner, RSET
    assert units("refused", SPAM) == 7        # only a 4xx in place of the banner
    assert units("shed", {}) == units("refused", {"shed_by_stage": None}) == 0


def test_phases_are_what_the_report_says() -> None:
    assert PHASES["shed"].ingress["lanes.bulk"]["rate"] > 0          # 0 would be uncapped
    assert PHASES["refused"].ingress["admission"]["per_ip_rate"] > 0  # 0 would be off
    for p in PHASES.values():
        assert p.postfix["smtpd_peername_lookup"] == "no"            # no DNS, as the ingress


def _run(cpu: dict[str, float] | None, n: int, wall: float = 2.0) -> dict[str, Any]:
    return {"cpu_s": cpu, "units": n, "wall_s": wall}


def test_less_idle_takes_the_idle_rate_over_the_window_off() -> None:
    runs = [_run({"acceptor": 1.0, "broker": 0.1}, 1000), _run({"acceptor": 3.0}, 1000),
            _run({"acceptor": 2.0}, 1000), _run({"acceptor": 9.0}, 0), _run(None, 10)]
    # totals 1.1, 3.0, 2.0 s over 1000 units: median 2.0 ms; less 50 ms/s x 2 s per 1000
    assert less_idle(runs, 50.0) == 1.9
    assert less_idle(runs, 0.0) == 2.0
    assert less_idle([_run(None, 5)], 10.0) is None


def test_markdown_rows_and_no_equivalent() -> None:
    doc = {"params": {"runs": 3, "seconds": 8.0, "spammers": 100}, "phases": {
        "shed": {"unit": "shed transaction", "targets": {
            "smtp-ingress": {"status": "ok", "per_unit_ms": {"acceptor": 0.9, "broker-bulk":
                                                             0.01, "all": 0.91},
                             "less_idle_ms": 0.9, "units_per_s": 850.0,
                             "idle_cpu_ms_per_s": 15.0},
            "postfix": {"status": "skipped", "reason": "not root"}}}}}
    md = markdown(doc)
    assert "### CPU per shed transaction and per refused connection" in md
    assert ("| shed transaction | smtp-ingress | 0.910 | 0.900 | acceptor 0.900, "
            "broker-bulk 0.010 | 850 | 15.0 |") in md
    assert "| shed transaction | postfix | no equivalent measured: not root |" in md
    assert markdown(None) == markdown({"phases": {}}) == ""
