"""pack SRC.npz DST.npz: a proposals cache as int16 (2 x pixels, exact for half pixels), compressed, to carry;
unpack DST.npz SRC.npz: back to the float32 cache data.save_proposals writes (same keys, same meta)."""
import json, sys
import numpy as np
import data
mode, src, dst = sys.argv[1:4]
f = np.load(src, allow_pickle=False)
if mode == "pack":
    meta = str(f["__meta__"]); keys = json.loads(meta)["images"]
    boxes = [f[k] for k in keys]
    flat = np.concatenate(boxes) * 2
    assert np.array_equal(flat, np.round(flat)) and flat.max() < 32767
    np.savez_compressed(dst, meta=np.array(meta), counts=np.array([len(b) for b in boxes]), boxes=flat.astype(np.int16))
else:
    meta = json.loads(str(f["meta"])); keys = meta["images"]
    parts = np.split(f["boxes"].astype(np.float32) / 2, np.cumsum(f["counts"])[:-1])
    data.save_proposals(dst, keys, parts, meta)
