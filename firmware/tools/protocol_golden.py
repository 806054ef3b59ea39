#!/usr/bin/env python3
"""Golden frames of the pe-clip link protocol, computed independently of the Rust code.

postcard's encoding written out by hand (varint = unsigned LEB128; enum = varint variant index
then fields; u8 raw; u16/u32 varint), CRC-32 from Python's zlib (ISO-HDLC), COBS by hand. Prints
one line per message; firmware/src/protocol.rs (test `golden_bytes`) and PROTOCOL.md carry them.
Run: python3 firmware/tools/protocol_golden.py
"""
import zlib

VERSION = 1


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def cobs(data):
    out = bytearray()
    block = bytearray()
    for b in data:
        if b == 0:
            out.append(len(block) + 1)
            out += block
            block = bytearray()
        else:
            block.append(b)
            if len(block) == 254:
                out.append(255)
                out += block
                block = bytearray()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def frame(payload):
    body = bytes([VERSION]) + payload
    body += zlib.crc32(body).to_bytes(4, "little")
    return cobs(body) + b"\x00"


negative = (1 << 1) | (1 << 3) | (1 << 5) | (1 << 6)
messages = [
    ("Hello { protocol: 1, sender: CameraLoop }", varint(0) + bytes([1]) + varint(0)),
    ("Heartbeat { seq: 300 }", varint(1) + varint(300)),
    (
        "Expression { class: 3, confidence_permille: 875, time_ms: 123456 }",
        varint(2) + bytes([3]) + varint(875) + varint(123456),
    ),
    ("Alert { kind: NegativeExpression, level: 2 }", varint(3) + varint(0) + bytes([2])),
    ("Alert { kind: LinkLost, level: 1 }", varint(3) + varint(1) + bytes([1])),
    (
        "Config(Config { negative_classes: 0b1101010, threshold_permille: 600, hold_ms: 2000, "
        "heartbeat_timeout_ms: 3000 })",
        varint(4) + varint(negative) + varint(600) + varint(2000) + varint(3000),
    ),
]
for name, payload in messages:
    print(f"{' '.join(f'{b:02x}' for b in frame(payload))}  {name}")
