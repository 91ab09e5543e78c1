//! CUDA launch code for gelu (to be written).
