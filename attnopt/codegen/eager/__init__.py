"""Kernels written as batched torch ops: the CPU path where no compiled kernel exists, and the
block structure the compiled kernels follow."""
