"""The acceptor's fast paths must agree with aiosmtpd's general code wherever they apply."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from ingress.edge.smtp import IngressSMTP
from ingress.edge.smtp_commands import _SIMPLE_ADDRESS

ADDRESSES = [
    "<a@b.c>", "<a@b.c> SIZE=10", " <a.b@c.d>", "<>", "<a@[1.2.3.4]>", "a@b.c",
    '<"x y"@b.c>', "<@r1,@r2:a@b.c>", "<a..b@c>", "<a@b.c>BODY=8BITMIME", "<.a@b>",
    "<user+tag@sub.example.test> SIZE=123 BODY=8BITMIME", "<a@b.c>   ", "<a@-b.c>",
    "<o'brien@example.test>", "<a@b>", "<ünï@exämple.test>", "<a@b.c", "a@b.c>", "<a b@c>",
    "<a@b.c> <d@e.f>", "<x%y@example.test>", "<a@b.c.>", "\t<a@b.c>\tSMTPUTF8",
]


def bare(cls: type) -> SMTP:
    s = cls.__new__(cls)
    s.local_part_limit = 0
    return s


@pytest.mark.parametrize("arg", ADDRESSES)
def test_getaddr_agrees_with_aiosmtpd(arg: str) -> None:
    assert IngressSMTP._getaddr(bare(IngressSMTP), arg) == SMTP._getaddr(bare(SMTP), arg)


def test_fast_path_is_taken_for_the_common_case() -> None:
    assert _SIMPLE_ADDRESS.match("<user+tag@sub.example.test> SIZE=123")
    assert not _SIMPLE_ADDRESS.match('<"quoted"@example.test>')
