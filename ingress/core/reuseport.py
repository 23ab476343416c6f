"""Kernel steering of port 25's operator clients to the fast acceptors (Linux, SO_REUSEPORT).

Port 25's listening sockets form one SO_REUSEPORT group per address: one socket per port-25
acceptor, and with steering one more per fast acceptor (last, in slot order: a socket's index
in the group is the order it started listening). A classic BPF program attached to the group
(SO_ATTACH_REUSEPORT_CBPF) picks the socket for each new connection from the SYN's source
address: a client in one of the operator's allow-list networks (classify.allow_cidrs) goes to
a fast acceptor's socket, every other client to a port-25 acceptor's, at random. So an
allow-listed client is accepted, classified and served on a fast acceptor's event loop (nice
0) and never waits for a port-25 acceptor's loop, which under a flood is busy with the bots and
yields the cores (supervisor.acceptor_nice). Without steering it is accepted there first and
handed over (ingress.edge.handoff), which is where its time went under a flood.

API
    program(networks, acceptors, fast) -> bytes | None
        the program (struct sock_filter array) for one group of one address family (no
        networks: every client to the port-25 sockets), or None when there is no fast
        acceptor or socket of port 25, or too many networks for one program (MAX_NETWORKS:
        the caller logs it and does not steer)
    attach(sock, prog)          setsockopt(SO_ATTACH_REUSEPORT_CBPF) on any socket of the group
                                (it applies to the whole group, and replaces an earlier one)
    (the mutual-TLS port's group: its mTLS acceptors' sockets, then one per fast acceptor;
    program(verified addresses, mtls acceptors, fast): ingress.tools.listeners.steer_known)

Failure modes: attach raises OSError where the kernel has no reuseport BPF (before 4.5) or
refuses the program; the caller then closes the fast acceptors' sockets (they leave the group)
and serves as without steering.
Limits: MAX_NETWORKS per family (a CBPF program has at most 4096 instructions); the index
order relies on the group's sockets never being closed while it serves (the supervisor's
sockets outlive their acceptors); a connection steered to a fast acceptor waits in that
socket's backlog while the acceptor restarts.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_AD_OFF, SKF_AD_RANDOM = -0x1000, 56
SKF_NET_OFF = -0x100000
MAX_NETWORKS = 250              # per family: 13 instructions each (IPv6) stays under 4096

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS, _AND_K, _ADD_K, _MOD_K = 0x20, 0x54, 0x04, 0x94
_JEQ_K, _JA, _RET_K, _RET_A = 0x15, 0x05, 0x06, 0x16

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _words(n: Network) -> list[tuple[int, int, int]]:
    """(byte offset in the IP header, mask, value) of each 32-bit word of the source address
    that the network constrains."""
    first = 12 if n.version == 4 else 8          # the source address in the IP header
    addr, mask = int(n.network_address), int(n.netmask)
    count = 1 if n.version == 4 else 4
    out = []
    for i in range(count):
        shift = 32 * (count - 1 - i)
        m = (mask >> shift) & 0xFFFFFFFF
        if m:
            out.append((first + 4 * i, m, (addr >> shift) & 0xFFFFFFFF))
    return out


def program(networks: Iterable[Network], acceptors: int, fast: int) -> bytes | None:
    """Sources in `networks` -> one of the `fast` sockets after the `acceptors` port-25 ones
    (at random among them), every other source -> one of the port-25 ones at random."""
    nets = list(networks)
    if fast <= 0 or acceptors <= 0 or len(nets) > MAX_NETWORKS:
        return None
    blocks: list[list[bytes]] = []
    for n in nets:
        words = _words(n)
        if not words:           # 0.0.0.0/0 or ::/0: every source is the operator's
            blocks.append([])
            continue
        block: list[bytes] = []
        for j, (off, mask, value) in enumerate(words):
            left = len(words) - 1 - j
            block.append(_ins(_LD_W_ABS, 0, 0, SKF_NET_OFF + off))
            block.append(_ins(_AND_K, 0, 0, mask))
            # no match: skip this network's other words and its jump (3 each, then 1)
            block.append(_ins(_JEQ_K, 0, 3 * left + 1, value))
        blocks.append(block)
    # layout: [network blocks, each ending in "ja FAST"] [OTHERS] [FAST]
    others = [_ins(_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_RANDOM),
              _ins(_MOD_K, 0, 0, acceptors), _ins(_RET_A, 0, 0, 0)]
    code: list[bytes] = []
    total = sum(len(b) + 1 for b in blocks)
    for b in blocks:
        code += b
        here = len(code) + 1                    # the instruction after the jump
        code.append(_ins(_JA, 0, 0, total - here + len(others)))
    code += others
    code += [_ins(_LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_RANDOM),
             _ins(_MOD_K, 0, 0, fast), _ins(_ADD_K, 0, 0, acceptors), _ins(_RET_A, 0, 0, 0)]
    return b"".join(code)


def attach(sock: socket.socket, prog: bytes) -> None:
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
