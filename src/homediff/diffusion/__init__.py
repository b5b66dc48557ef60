"""The diffusion process: rectified flow (training targets, time sampling) and samplers."""
