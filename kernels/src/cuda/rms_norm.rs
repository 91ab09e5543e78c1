//! CUDA launch code for rms_norm (to be written).
