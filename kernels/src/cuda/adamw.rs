//! CUDA launch code for adamw (to be written).
