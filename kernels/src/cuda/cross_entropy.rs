//! CUDA launch code for cross_entropy (to be written).
