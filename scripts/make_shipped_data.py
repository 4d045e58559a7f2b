"""Build the small MNIST subset that ships inside the package (run once; output is committed).

Takes the first 10,000 training and first 2,000 test images of the original MNIST IDX files (LeCun, Cortes,
Burges; CC BY-SA 3.0) and writes them back in the same IDX format, gzip-compressed.

    python scripts/make_shipped_data.py /path/to/mnist  # folder with the four original *-ubyte.gz files
"""

import gzip
import sys
from pathlib import Path

import numpy as np

N = {"train": 10_000, "t10k": 2_000}


def _read(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _write(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def main(src: Path) -> None:
    out = Path(__file__).resolve().parents[1] / "src/lowprec/data/shipped/mnist"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in N.items():
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            _write(out / name, _read(src / name)[:n])
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
