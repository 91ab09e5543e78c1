//! CUDA launch code for softmax (to be written).
