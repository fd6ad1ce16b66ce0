"""numba kernels only: no I/O, no torch. Flat numpy arrays in, flat numpy arrays out.

numba's OpenMP threading layer spin-waits between parallel regions, which starves the
hashing and reading threads on small machines; the workqueue layer does not. A user's own
``NUMBA_THREADING_LAYER`` still wins.
"""

import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
