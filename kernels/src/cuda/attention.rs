//! CUDA launch code for attention (to be written).
