//! CUDA launch code for layer_norm (to be written).
