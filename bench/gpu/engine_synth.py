"""A SmolLM2-shaped GGUF with random weights and SmolLM2's own metadata and tokenizer (kv.bin): for timing."""
import json, struct, sys
import numpy as np
kv = open(sys.argv[1], "rb").read()
shapes = json.load(open(sys.argv[2]))
out = sys.argv[3]
rng = np.random.default_rng(0)
infos, datas, off = [], [], 0
for t in shapes:
    shape = t["shape"]
    if len(shape) == 1:
        a, typ = np.ones(shape, dtype=np.float32), 0
    else:
        a, typ = (rng.standard_normal(shape[::-1], dtype=np.float32) * 0.05).astype(np.float16), 1
    name = t["name"].encode()
    infos.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(shape))
                 + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", typ, off))
    b = a.tobytes()
    pad = (-len(b)) % 32
    datas.append(b + b"\0" * pad)
    off += len(b) + pad
n_kv = struct.unpack("<Q", kv[:8])[0]
head = struct.pack("<IIQQ", 0x46554747, 3, len(shapes), n_kv) + kv[8:] + b"".join(infos)
head += b"\0" * ((-len(head)) % 32)
with open(out, "wb") as f:
    f.write(head)
    for d in datas:
        f.write(d)
print(out, off + len(head))
