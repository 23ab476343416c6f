"""A retry after our own deferral is evidence, if earned (issue 8, item 2; issue 17, item 4;
ingress.policy.deferrals).

The real ingress (supervisor, acceptors, brokers, workers) on loopback, with a bulk cap so low
(lanes.bulk.rate = 0.001/s, burst 1) that once a bounded spam loop has spent it, every further
bulk transaction is shed for the rest of the test: the cap is saturated deterministically, no
timing involved. The legitimate client is 127.0.0.1; the spam comes from 127.0.1.2 (another /24,
so the deferral records of the two never share a network's quota).

- a deferred message, retried after admission.retry_min_delay, is accepted while spam keeps the
  bulk cap saturated (once: the record is spent), and the metrics count the deferral, the
  bypass, the deferred-then-accepted message and the time since its first deferral;
- a retry before the minimum delay is shed (and counted too_early); after it, accepted;
- a bot that retries everything at once gets only the retry share: the rest are shed;
- with two acceptors, a retry landing on the acceptor that did not defer it is recognised;
- (issue 17) a bot rotating 32 senders from one /24, hammering, earns nothing, and an honest MTA
  of another network gets its bypass by its third retry; the retry share is divided between
  networks (a bot that does not hammer takes its network's part, no more); the deferral is made
  at the first RCPT TO and a retry may carry only recipients of the deferred transaction.
(The IPv6 /48 bounds are table tests of the store: loopback IPv6 is ::1 alone.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tests.kit.harness import Ingress, make_body, send_one, smtp_dialogue
from tests.kit.scrape import metrics_port, scrape, value

SPAM_SOURCE = "127.0.1.2"
MIN_DELAY = 1.0


def tables(acceptors: int = 1, burst: int = 1, share: float = 0.5,
           min_delay: float = MIN_DELAY) -> dict[str, dict[str, Any]]:
    return {
        "supervisor": {"acceptors": acceptors},
        "lanes.bulk": {"rate": 0.001, "burst": burst, "workers": 1},
        "lanes.fast": {"workers": 1},
        "admission": {"retry_share": share, "retry_min_delay": min_delay, "retry_ttl": 600.0,
                      "shed_delay": 0.0},
        "metrics": {"listen": "127.0.0.1:0"},
    }


async def saturate(port: int, streak: int = 3, attempts: int = 100) -> None:
    """Spend the bulk cap: spam (fresh senders, from SPAM_SOURCE) until `streak` transactions
    in a row are shed. Bounded by `attempts`."""
    run = 0
    for i in range(attempts):
        code, _ = await send_one(port, make_body(i, 200), sender=f"spam{i}@spam.test",
                                 source=SPAM_SOURCE)
        run = run + 1 if code in (421, 451) else 0
        if run >= streak:
            return
    raise AssertionError("the bulk cap was never saturated")


async def spam_loop(port: int, stop: asyncio.Event, counts: dict[str, int],
                    limit: int = 400) -> None:
    """Keep the cap saturated while the test runs: bounded in count (and by `stop`)."""
    for i in range(limit):
        if stop.is_set():
            return
        code, _ = await send_one(port, make_body(i, 200), sender=f"loop{i}@spam.test",
                                 source=SPAM_SOURCE)
        counts[str(code)] = counts.get(str(code), 0) + 1
        await asyncio.sleep(0.02)


def bodies_from(ing: Ingress, sender: str) -> int:
    return sum(1 for e in ing.spooled().values() if e.envelope.get("mail_from") == sender)


def test_retry_accepted_while_bulk_cap_saturated(tmp_path: Path) -> None:
    with Ingress(tmp_path, tables()) as ing:
        mport = metrics_port(ing)

        async def scenario() -> tuple[int, int, int, dict[str, int]]:
            await saturate(ing.port)
            stop, counts = asyncio.Event(), {}
            spam = asyncio.create_task(spam_loop(ing.port, stop, counts))
            try:
                first, _ = await send_one(ing.port, make_body(1), sender="legit@sender.test")
                await asyncio.sleep(MIN_DELAY + 0.3)
                retry, text = await send_one(ing.port, make_body(2), sender="legit@sender.test")
                assert retry == 250, text
                # one deferral bought one bypass: the same sender again is shed
                again, _ = await send_one(ing.port, make_body(3), sender="legit@sender.test")
                await asyncio.sleep(0.3)          # spam still shed after the retry got in
            finally:
                stop.set()
                await spam
            return first, retry, again, counts

        first, retry, again, counts = asyncio.run(scenario())
        assert (first, retry, again) == (451, 250, 451)
        assert counts.get("250", 0) == 0 and counts.get("451", 0) >= 1, counts
        assert bodies_from(ing, "legit@sender.test") == 1
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferrals_total", lane="bulk", reason="rcpt_cap") >= 2
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="bypassed") == 1
        assert value(m, "smtp_ingress_deferred_accepted_total", lane="bulk") == 1
        assert value(m, "smtp_ingress_deferred_to_accepted_seconds_count", lane="bulk") == 1
        assert value(m, "smtp_ingress_deferred_to_accepted_seconds_sum",
                     lane="bulk") >= MIN_DELAY
        assert value(m, "smtp_ingress_deferred_to_accepted_seconds_bucket", lane="bulk",
                     le="1.0") == 0


def test_retry_before_min_delay_is_shed(tmp_path: Path) -> None:
    delay = 5.0      # the two attempts "at once" must come within it, even on a loaded machine
    with Ingress(tmp_path, tables(min_delay=delay)) as ing:
        mport = metrics_port(ing)

        async def scenario() -> list[int]:
            await saturate(ing.port)
            codes = []
            for _ in range(2):       # at once, like a bot: shed, and it restarts the wait
                codes.append((await send_one(ing.port, make_body(1),
                                             sender="eager@sender.test"))[0])
            await asyncio.sleep(delay + 0.3)
            codes.append((await send_one(ing.port, make_body(2), sender="eager@sender.test"))[0])
            return codes

        assert asyncio.run(scenario()) == [451, 451, 250]
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="too_early") == 1
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="bypassed") == 1
        assert bodies_from(ing, "eager@sender.test") == 1


def test_retries_beyond_the_share_are_shed(tmp_path: Path) -> None:
    """A bot that read the code: defers five senders, waits the minimum delay and retries
    them all at once. The retry share (one token here) lets one through; the rest are shed."""
    with Ingress(tmp_path, tables()) as ing:
        mport = metrics_port(ing)
        senders = [f"bot{i}@bot.test" for i in range(5)]

        async def scenario() -> tuple[list[int], list[int]]:
            await saturate(ing.port)
            firsts = [(await send_one(ing.port, make_body(i), sender=s))[0]
                      for i, s in enumerate(senders)]
            await asyncio.sleep(MIN_DELAY + 0.3)
            retries = await asyncio.gather(*(send_one(ing.port, make_body(i), sender=s)
                                             for i, s in enumerate(senders)))
            return firsts, sorted(code for code, _ in retries)

        firsts, retries = asyncio.run(scenario())
        assert firsts == [451] * 5
        assert retries == [250, 451, 451, 451, 451]
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="bypassed") == 1
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="over_share") == 4
        assert value(m, "smtp_ingress_deferred_accepted_total", lane="bulk") == 1


def test_retry_recognised_on_the_other_acceptor(tmp_path: Path) -> None:
    """SO_REUSEPORT sends a retry to any acceptor: the record made by the acceptor that
    deferred it reaches the other one through the bulk broker. Ten deferred senders, each
    retried once: every retry is recognised, wherever it lands, and at least one lands on
    the other acceptor (all ten on the same one as their deferral: 1 in 1024)."""
    n = 10
    with Ingress(tmp_path, tables(acceptors=2, burst=24, share=1.0)) as ing:
        mport = metrics_port(ing)
        senders = [f"mta{i}@partner.test" for i in range(n)]

        async def scenario() -> tuple[list[int], list[int]]:
            await saturate(ing.port, streak=12, attempts=150)   # both acceptors' shares spent
            firsts = [(await send_one(ing.port, make_body(i), sender=s))[0]
                      for i, s in enumerate(senders)]
            await asyncio.sleep(MIN_DELAY + 0.3)
            retries = [(await send_one(ing.port, make_body(i), sender=s))[0]
                       for i, s in enumerate(senders)]
            return firsts, retries

        firsts, retries = asyncio.run(scenario())
        assert firsts == [451] * n
        assert retries == [250] * n
        bypasses = ing.events("retry_bypass")
        assert len(bypasses) == n
        assert all(e["deferred_by"] for e in bypasses), bypasses
        assert any(e["deferred_by"] != e["acceptor"] for e in bypasses), bypasses
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferred_accepted_total", lane="bulk") == n


def test_retry_of_a_data_time_deferral(tmp_path: Path) -> None:
    """The broker's cap is spent while an acceptor's share at MAIL FROM still has a token:
    the transaction is deferred after DATA (NACK rate), and recorded with its recipient. Its
    retry takes the retry share at MAIL FROM and the broker's retry bucket after DATA."""
    with Ingress(tmp_path, tables(acceptors=2, burst=1, share=0.5)) as ing:
        mport = metrics_port(ing)

        async def scenario() -> tuple[str, int]:
            code, text = await send_one(ing.port, make_body(0, 200), sender="spam@spam.test",
                                        source=SPAM_SOURCE)
            assert code == 250, text            # the broker's only token, and one acceptor's
            for i in range(16):                 # until one lands on the other acceptor
                sender = f"late{i}@sender.test"
                replies = await smtp_dialogue(ing.port, [
                    b"EHLO client.test\r\n", f"MAIL FROM:<{sender}>\r\n".encode(),
                    b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n",
                    make_body(i, 200) + b".\r\n", b"QUIT\r\n"])
                if replies[2].startswith("250") and replies[5].startswith("451"):
                    break
            else:
                raise AssertionError("no transaction reached DATA on the other acceptor")
            await asyncio.sleep(MIN_DELAY + 0.3)
            code, text = await send_one(ing.port, make_body(99, 200), sender=sender)
            return sender, code

        sender, code = asyncio.run(scenario())
        assert code == 250
        assert bodies_from(ing, sender) == 1
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferrals_total", lane="bulk", reason="data_rate") >= 1
        assert value(m, "smtp_ingress_deferred_accepted_total", lane="bulk") == 1


# --- issue 17, item 4: retry evidence has to be earned ----------------------------------------

BOT_SENDERS = 32
BOT_SOURCES = [f"127.0.1.{10 + i}" for i in range(8)]     # one /24: the bot's network


async def rotating_bot(port: int, stop: asyncio.Event, counts: dict[str, int],
                       pace: float = 0.05, limit: int = 3000) -> None:
    """A bot that read the code: it rotates BOT_SENDERS senders (each retried when its turn
    comes round, which is later than admission.retry_min_delay) from several addresses of one
    /24, as fast as it can. Bounded in count (and by `stop`)."""
    for i in range(limit):
        if stop.is_set():
            return
        code, _ = await send_one(port, make_body(i, 200), sender=f"bot{i % BOT_SENDERS}@bot.test",
                                 source=BOT_SOURCES[i % len(BOT_SOURCES)])
        counts[str(code)] = counts.get(str(code), 0) + 1
        counts["attempts"] = counts.get("attempts", 0) + 1
        await asyncio.sleep(pace)


def test_a_bot_rotating_senders_does_not_take_the_retry_share(tmp_path: Path) -> None:
    """Was (issue 17, measured 7): every shed MAIL FROM added a credit to its record, so a bot
    rotating 32 senders from one /24 ripened a record at every turn and took every token of
    the retry share; an honest MTA retrying its deferred message got none. Now a network shed
    many times a minute earns nothing, and the honest MTA (another network) gets its bypass
    by its third retry. The retry share here is 4 tokens (burst 8 x 0.5), refilled never."""
    with Ingress(tmp_path, tables(burst=8, share=0.5)) as ing:
        mport = metrics_port(ing)

        async def scenario() -> tuple[list[int], dict[str, int]]:
            await saturate(ing.port)
            stop, bot = asyncio.Event(), {}
            task = asyncio.create_task(rotating_bot(ing.port, stop, bot))
            try:
                # two full turns of the bot: on the old code it had taken the share by then
                deadline = time.monotonic() + 60
                while bot.get("attempts", 0) < 2 * BOT_SENDERS + 4 and not task.done():
                    assert time.monotonic() < deadline, bot
                    await asyncio.sleep(0.1)
                honest = [(await send_one(ing.port, make_body(1), sender="mta@partner.test"))[0]]
                for i in range(3):                  # three retries, each after the minimum wait
                    if 250 in honest:
                        break
                    await asyncio.sleep(MIN_DELAY + 0.3)
                    honest.append((await send_one(ing.port, make_body(2 + i),
                                                  sender="mta@partner.test"))[0])
            finally:
                stop.set()
                await task
            return honest, bot

        honest, bot = asyncio.run(scenario())
        assert honest[0] == 451 and honest[-1] == 250, (honest, bot)
        assert bot.get("250", 0) == 0, bot
        assert bodies_from(ing, "mta@partner.test") == 1
        assert not any(e.get("mail_from", "").startswith("bot")
                       for e in (s.envelope for s in ing.spooled().values()))
        m = scrape(mport)
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="bypassed") == 1
        assert value(m, "smtp_ingress_deferral_retries_total", lane="bulk",
                     result="hammered") >= 1


def test_the_retry_share_is_divided_between_networks(tmp_path: Path) -> None:
    """Was: a bot that defers 8 senders from one /24 (slowly: it does not hammer) and retries
    them all at once after the minimum wait took all 4 tokens of the retry share, and the
    honest MTA's retry from another network found it spent. Now each network holding records
    gets its part (2 of 4 here: two networks): the bot 2, the honest MTA its one."""
    with Ingress(tmp_path, tables(burst=8, share=0.5)) as ing:
        senders = [f"bot{i}@bot.test" for i in range(8)]

        async def scenario() -> tuple[list[int], list[int]]:
            await saturate(ing.port)
            firsts = [(await send_one(ing.port, make_body(i), sender=s,
                                      source=BOT_SOURCES[i % len(BOT_SOURCES)]))[0]
                      for i, s in enumerate(senders)]
            firsts.append((await send_one(ing.port, make_body(9), sender="mta@partner.test"))[0])
            await asyncio.sleep(MIN_DELAY + 0.3)
            retries = await asyncio.gather(*(
                send_one(ing.port, make_body(i), sender=s,
                         source=BOT_SOURCES[i % len(BOT_SOURCES)])
                for i, s in enumerate(senders)))
            honest, _ = await send_one(ing.port, make_body(10), sender="mta@partner.test")
            return firsts, [*(code for code, _ in retries), honest]

        firsts, codes = asyncio.run(scenario())
        assert firsts == [451] * 9
        bot, honest = codes[:-1], codes[-1]
        assert honest == 250, codes
        assert 1 <= bot.count(250) <= 2, codes          # the bot's network: its part, no more
        assert bodies_from(ing, "mta@partner.test") == 1


def test_a_retry_carries_only_the_deferred_recipients(tmp_path: Path) -> None:
    """The deferral is made at the first RCPT TO (every later RCPT of that transaction is
    deferred too, and remembered): a retry is recognised by a recipient it deferred, and may
    carry only those; another recipient on it is deferred (451), not let in on the bypass."""
    with Ingress(tmp_path, tables()) as ing:
        sender = "mta@partner.test"

        async def scenario() -> tuple[list[str], list[str]]:
            await saturate(ing.port)
            first = await smtp_dialogue(ing.port, [
                b"EHLO partner.test\r\n", f"MAIL FROM:<{sender}>\r\n".encode(),
                b"RCPT TO:<bob@example.test>\r\n", b"RCPT TO:<carol@example.test>\r\n",
                b"QUIT\r\n"])
            await asyncio.sleep(MIN_DELAY + 0.3)
            retry = await smtp_dialogue(ing.port, [
                b"EHLO partner.test\r\n", f"MAIL FROM:<{sender}>\r\n".encode(),
                b"RCPT TO:<carol@example.test>\r\n", b"RCPT TO:<dave@example.test>\r\n",
                b"DATA\r\n", make_body(1, 200) + b".\r\n", b"QUIT\r\n"])
            return first, retry

        first, retry = asyncio.run(scenario())
        assert [r[:3] for r in first[2:5]] == ["250", "451", "451"], first
        assert [r[:3] for r in retry[2:7]] == ["250", "250", "451", "354", "250"], retry
        spooled = [e.envelope for e in ing.spooled().values() if e.envelope["mail_from"] == sender]
        assert [env["rcpts"] for env in spooled] == [["carol@example.test"]], spooled
