"""Write archc/training/data_files/digits.npz from scikit-learn's copy of the UCI handwritten digits.

Run once, where scikit-learn is installed (it is not an archc dependency):

    python scripts/export_digits.py

The file holds ``images``: uint8 [1797, 8, 8] with grey levels 0..16 (ink is
high), and ``labels``: uint8 [1797] with the digit 0..9, in scikit-learn's
order. ``archc.training.images`` reads it; nothing at run time needs
scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "archc" / "training" / "data_files" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    if not np.array_equal(images, digits.images):  # grey levels are whole numbers 0..16
        raise SystemExit("scikit-learn's digits are no longer whole grey levels 0..16; check the export")
    labels = digits.target.astype(np.uint8)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes): images {images.shape}, labels {labels.shape}")


if __name__ == "__main__":
    main()
