//! CUDA launch code for embedding (to be written).
