"""numba kernels only: no I/O, no torch. Flat numpy arrays in, flat numpy arrays out."""
