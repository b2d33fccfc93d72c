#!/usr/bin/env python3
"""Draws assets/icon.png, the console's app icon, with the standard library only.

Three timeline tracks (one per node) in the console's Okabe-Ito phase colours,
crossed by the light band of the freeze window, on a dark rounded square.
Not part of the build: run it by hand when the icon should change.
"""
import struct
import sys
import zlib

SIZE = 256
BG = (0x1F, 0x2A, 0x36)
BAND = (0xE8, 0xEE, 0xF4)
SKY, BLUE, ORANGE, GREEN, YELLOW = (0x56, 0xB4, 0xE9), (0x00, 0x72, 0xB2), (0xE6, 0x9F, 0x00), (0x00, 0x9E, 0x73), (0xF0, 0xE4, 0x42)

# (x0, x1, colour) segments of each track; the three tracks start and end a little apart.
TRACKS = [
    [(40, 96, SKY), (96, 150, ORANGE), (150, 196, GREEN), (196, 216, YELLOW)],
    [(46, 84, SKY), (84, 152, BLUE), (152, 190, GREEN), (190, 210, YELLOW)],
    [(44, 110, SKY), (110, 152, BLUE), (152, 200, GREEN), (200, 222, YELLOW)],
]


def inside_rounded(x, y, r=44):
    cx = min(max(x, r), SIZE - 1 - r)
    cy = min(max(y, r), SIZE - 1 - r)
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def pixel(x, y):
    if not inside_rounded(x, y):
        return (0, 0, 0, 0)
    # Freeze window band behind the tracks.
    if 80 <= x <= 160 and 36 <= y <= 220:
        base = tuple(int(b * 0.25 + BG[i] * 0.75) for i, b in enumerate(BAND))
    else:
        base = BG
    for i, segs in enumerate(TRACKS):
        top = 56 + i * 56
        if top <= y < top + 36:
            for x0, x1, c in segs:
                if x0 <= x < x1 - 3:
                    return c + (255,)
    # Band edges.
    if (x in (80, 81, 159, 160)) and 36 <= y <= 220:
        return BAND + (255,)
    return base + (255,)


def png(width, height, rows):
    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "assets/icon.png"
    rows = [[pixel(x, y) for x in range(SIZE)] for y in range(SIZE)]
    with open(out, "wb") as f:
        f.write(png(SIZE, SIZE, rows))
    print(f"wrote {out}")
