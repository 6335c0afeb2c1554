"""One module per op family: validation, torch.library registration, fake kernels, autograd."""
