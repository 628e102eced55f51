"""Shrink a CUDA library for one GPU generation: zero every cubin built for another SM.

The onnxruntime-gpu wheel's CUDA provider (about 280 MB) carries cubins for sm_75 ... sm_120 and
compresses poorly, so it cannot travel to the GPU machine (64 MiB a call). Zeroing the payload
of the cubins for other SMs keeps every fatbin header intact (the driver still walks them and
picks the sm_90 entry on an H100/H200) and lets xz squeeze the zeros away.

    python scripts/prune_fatbin.py libonnxruntime_providers_cuda.so 90 pruned.so
"""

from __future__ import annotations

import struct
import sys

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
KIND_PTX, KIND_CUBIN = 1, 2


def prune(data: bytearray, keep_sm: set[int]) -> dict[str, int]:
    pos, totals = 0, {"kept": 0, "zeroed": 0, "ptx": 0}
    while (start := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header_size, fat_size = struct.unpack_from("<HHQ", data, start + 4)
        end = start + 16 + fat_size
        if version != 1 or header_size != 16 or fat_size == 0 or end > len(data):
            pos = start + 4  # the magic bytes by chance, not a fatbin header
            continue
        entry, valid = start + 16, True
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, entry)
            if kind not in (KIND_PTX, KIND_CUBIN, 4) or entry_header < 64 or entry + entry_header + size > end:
                valid = False
                break
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            payload = slice(entry + entry_header, entry + entry_header + size)
            if kind == KIND_CUBIN and sm not in keep_sm:
                data[payload] = bytes(size)
                totals["zeroed"] += size
            else:
                totals["ptx" if kind == KIND_PTX else "kept"] += size
            entry += entry_header + size
        pos = end if valid else start + 4
    return totals


def main() -> int:
    source, keep, target = sys.argv[1], {int(s) for s in sys.argv[2].split(",")}, sys.argv[3]
    with open(source, "rb") as f:
        data = bytearray(f.read())
    totals = prune(data, keep)
    with open(target, "wb") as f:
        f.write(data)
    print(f"{source}: kept {totals['kept'] / 1e6:.0f} MB of cubins for sm {sorted(keep)}, "
          f"zeroed {totals['zeroed'] / 1e6:.0f} MB, PTX {totals['ptx'] / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
